//! Helpers the replica-runtime integration tests share.

use std::io::Read;

use modelgate_protocol::{decode_header, Kind, HEADER_LEN};

/// Reads one frame of the replica protocol: its kind and payload.
pub fn read_frame(s: &mut impl Read) -> (Option<Kind>, Vec<u8>) {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    let header = decode_header(header).unwrap();
    let mut payload = vec![0u8; header.payload_len];
    s.read_exact(&mut payload).unwrap();
    (Kind::from_u8(header.kind), payload)
}
