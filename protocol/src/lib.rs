//! The wire format spoken between the proxy and a replica process over a Unix domain socket.
//!
//! Every message is one frame: a 4-byte big-endian length `N`, then `N` bytes made of a one-byte
//! [`Kind`] and the payload. The proxy sends one [`Kind::Predict`] and waits for exactly one
//! terminal answer ([`Kind::ResultOk`], [`Kind::ResultLent`] or [`Kind::ResultErr`]) before it sends anything else, so a
//! replica never holds two requests. Frames of kinds a peer does not know are skipped, which lets
//! later versions add replica-to-proxy messages (model metrics) before the terminal answer without
//! breaking older proxies.
//!
//! Payloads are JSON. A `Predict` payload is the caller's `request` value byte for byte and a
//! `ResultOk` payload is the function's return value already encoded, so the proxy splices them into
//! HTTP bodies without parsing them again.
//!
//! A replica on the proxy's machine may also offer an in-place region ([`Ready::in_place`]): a
//! buffer in its own memory that the proxy writes a large request into directly
//! (`process_vm_writev`, one copy), before it sends a short [`Kind::PredictInPlace`] frame that
//! says how long the request is. The body then never crosses the socket, where it would be
//! copied twice on the core the two processes share. The region is only written while the
//! replica has no request left to answer, so it never changes under one being read.
//!
//! The other way, a replica the proxy told it can read its memory ([`Kind::Lend`]) *lends* a
//! large answer: it sends a short [`Kind::ResultLent`] frame with the answer's address and
//! length, and keeps those bytes as they are until the proxy, having copied them out
//! (`process_vm_readv`), sends [`Kind::Taken`]. One answer at most is lent at a time; the others
//! go over the socket.
#![forbid(unsafe_code)]

pub mod glibc;

use serde::{Deserialize, Serialize};

/// Length of the leading run of `s` with no quote, backslash or control character: the part of a
/// JSON string's text that needs no escaping, on both sides of the wire.
#[inline]
pub fn json_plain_run(s: &[u8]) -> usize {
    let stop = memchr::memchr2(b'"', b'\\', s).unwrap_or(s.len());
    // Control characters: the minimum of the run, which compiles to vector instructions; only a
    // run that has one is searched again for where.
    let run = &s[..stop];
    if run.iter().copied().min().unwrap_or(u8::MAX) >= 0x20 {
        return stop;
    }
    run.iter().position(|&b| b < 0x20).unwrap_or(stop)
}

/// Version of this protocol; a replica announces it in its [`Ready`] frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes in a frame header: the 4-byte length and the kind byte.
pub const HEADER_LEN: usize = 5;

/// Upper bound on any frame, so a corrupt length can never make a peer allocate without limit.
pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Replica → proxy, once: the module imported and the function resolved. Payload: [`Ready`].
    Ready = 1,
    /// Replica → proxy, once, then the replica exits: loading failed. Payload: [`ModelError`].
    LoadFailed = 2,
    /// Replica → proxy: the function returned. Payload: its JSON-encoded return value.
    ResultOk = 3,
    /// Replica → proxy: the call failed. Payload: [`ModelError`].
    ResultErr = 4,
    /// Replica → proxy: answer to [`Kind::Ping`]. Empty payload.
    Pong = 5,
    /// Replica → proxy: the function returned; its JSON-encoded value is in the replica's memory,
    /// unchanged until the proxy sends [`Kind::Taken`]. Payload: [`encode_lent`]. Sent only
    /// after [`Kind::Lend`], and only while no other answer is lent.
    ResultLent = 6,
    /// Proxy → replica: call the function. Payload: the JSON request object.
    Predict = 16,
    /// Proxy → replica: are you alive and idle? Empty payload.
    Ping = 17,
    /// Proxy → replica: call the function with the request the proxy wrote at the start of the
    /// replica's in-place region. Payload: the request's length, 8 bytes big-endian. Sent only
    /// to a replica that announced a region, and only as the one request of its write.
    PredictInPlace = 18,
    /// Proxy → replica: the proxy can read this replica's memory, so answers of [`LEND_MIN`]
    /// bytes or more may be lent ([`Kind::ResultLent`]). Empty payload.
    Lend = 19,
    /// Proxy → replica: the lent answer has been copied out (or given up); its bytes are the
    /// replica's again. Empty payload.
    Taken = 20,
}

/// Answers from this size on are lent when the proxy allows it: below it, the socket's two
/// copies cost less than the frames and the wake-up lending takes.
pub const LEND_MIN: usize = 64 * 1024;

/// Payload of [`Kind::ResultLent`]: the answer's address and length, 8 bytes each, big-endian.
pub fn encode_lent(addr: u64, len: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&addr.to_be_bytes());
    out[8..].copy_from_slice(&(len as u64).to_be_bytes());
    out
}

/// The address and length a [`Kind::ResultLent`] payload gives; a length over
/// [`MAX_FRAME_BYTES`] is refused, as a frame that long would be.
pub fn decode_lent(payload: &[u8]) -> Result<(u64, usize), FrameError> {
    let bytes: [u8; 16] = payload
        .try_into()
        .map_err(|_| FrameError("lent answer frame is not 16 bytes"))?;
    let addr = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let len = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
    match usize::try_from(len) {
        Ok(len) if len <= MAX_FRAME_BYTES => Ok((addr, len)),
        _ => Err(FrameError("lent answer larger than the protocol allows")),
    }
}

impl Kind {
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Ready,
            2 => Kind::LoadFailed,
            3 => Kind::ResultOk,
            4 => Kind::ResultErr,
            5 => Kind::Pong,
            6 => Kind::ResultLent,
            16 => Kind::Predict,
            17 => Kind::Ping,
            18 => Kind::PredictInPlace,
            19 => Kind::Lend,
            20 => Kind::Taken,
            _ => return None,
        })
    }
}

/// Encodes a frame header for a payload of `payload_len` bytes.
pub fn encode_header(kind: Kind, payload_len: usize) -> [u8; HEADER_LEN] {
    let len = u32::try_from(payload_len + 1).expect("frame length fits in u32");
    let l = len.to_be_bytes();
    [l[0], l[1], l[2], l[3], kind as u8]
}

/// A decoded frame header: the raw kind byte and the payload length that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub payload_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub struct FrameError(pub &'static str);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for FrameError {}

/// Decodes a frame header, refusing empty and oversized frames.
pub fn decode_header(bytes: [u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len == 0 {
        return Err(FrameError("frame without a kind byte"));
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError("frame larger than the protocol allows"));
    }
    Ok(Header {
        kind: bytes[4],
        payload_len: len - 1,
    })
}

/// Payload of [`Kind::Ready`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub protocol: u32,
    pub pid: u32,
    pub python_version: String,
    /// Where the proxy may write large requests; absent when the replica offers none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_place: Option<InPlace>,
}

/// A replica's in-place region: `len` bytes at address `addr` of its address space.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct InPlace {
    pub addr: u64,
    pub len: u64,
}

/// Payload of [`Kind::PredictInPlace`] for a request of `len` bytes.
pub fn encode_in_place(len: usize) -> [u8; 8] {
    (len as u64).to_be_bytes()
}

/// The request length a [`Kind::PredictInPlace`] payload gives.
pub fn decode_in_place(payload: &[u8]) -> Result<usize, FrameError> {
    let bytes: [u8; 8] = payload
        .try_into()
        .map_err(|_| FrameError("in-place request frame is not 8 bytes"))?;
    usize::try_from(u64::from_be_bytes(bytes))
        .map_err(|_| FrameError("in-place request longer than memory"))
}

/// Payload of [`Kind::ResultErr`] and [`Kind::LoadFailed`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelError {
    pub kind: ModelErrorKind,
    /// Python exception type, e.g. `ZeroDivisionError`.
    pub exception: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelErrorKind {
    /// The function raised.
    Exception,
    /// The function returned something JSON cannot represent (a set, NaN, an arbitrary object).
    NotSerializable,
    /// The request payload was not valid JSON (the proxy validates it, so this is a bug).
    BadRequest,
    /// Importing the module or resolving the function failed.
    Load,
    /// The function ran out of memory under the replica's memory limit; the replica's state is
    /// suspect, so the proxy replaces it.
    OutOfMemory,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_run_stops_at_quotes_backslashes_and_control_characters() {
        assert_eq!(json_plain_run(b"abc\"def"), 3);
        assert_eq!(json_plain_run(b"abc\\"), 3);
        let mut long = vec![b'a'; 200];
        long[150] = b'\n';
        assert_eq!(json_plain_run(&long), 150);
        long[150] = b'"';
        long[10] = 0x1f;
        assert_eq!(json_plain_run(&long), 10);
        assert_eq!(json_plain_run(b"plain"), 5);
    }

    #[test]
    fn header_round_trips() {
        let h = encode_header(Kind::Predict, 42);
        assert_eq!(
            decode_header(h),
            Ok(Header {
                kind: Kind::Predict as u8,
                payload_len: 42
            })
        );
        assert_eq!(Kind::from_u8(h[4]), Some(Kind::Predict));
    }

    #[test]
    fn rejects_empty_and_oversized_frames() {
        assert!(decode_header([0, 0, 0, 0, 3]).is_err());
        let too_big = ((MAX_FRAME_BYTES + 2) as u32).to_be_bytes();
        assert!(decode_header([too_big[0], too_big[1], too_big[2], too_big[3], 3]).is_err());
    }

    #[test]
    fn in_place_lengths_round_trip_and_short_payloads_are_refused() {
        assert_eq!(decode_in_place(&encode_in_place(5 << 20)), Ok(5 << 20));
        assert!(decode_in_place(&[0; 7]).is_err());
    }

    #[test]
    fn lent_answer_frames_round_trip_and_refuse_what_no_frame_could_carry() {
        let addr = 0x7f00_1234_5000;
        assert_eq!(
            decode_lent(&encode_lent(addr, 5 << 20)),
            Ok((addr, 5 << 20))
        );
        assert!(decode_lent(&encode_lent(addr, MAX_FRAME_BYTES + 1)).is_err());
        assert!(decode_lent(&[0; 15]).is_err());
    }

    #[test]
    fn a_ready_frame_without_a_region_still_parses() {
        let old = r#"{"protocol":1,"pid":7,"python_version":"3.11.2"}"#;
        let ready: Ready = serde_json::from_str(old).unwrap();
        assert_eq!(ready.in_place, None);
        assert!(!serde_json::to_string(&ready).unwrap().contains("in_place"));
    }

    #[test]
    fn unknown_kinds_are_none() {
        assert_eq!(Kind::from_u8(200), None);
        for k in [
            Kind::Ready,
            Kind::LoadFailed,
            Kind::ResultOk,
            Kind::ResultErr,
            Kind::Pong,
            Kind::Predict,
            Kind::Ping,
            Kind::PredictInPlace,
            Kind::ResultLent,
            Kind::Lend,
            Kind::Taken,
        ] {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
        }
    }
}
