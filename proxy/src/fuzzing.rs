//! Entry points for the fuzz targets in `fuzz/` and for replaying their corpora as ordinary
//! tests (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must not panic, hang or
//! allocate without bound; the asserts are the properties a fuzzer should break if it can.

/// The prediction envelope parser, [`crate::envelope::Scanner`], checked against `serde_json`
/// parsing the same envelope ([`reference_envelope`]) and against itself fed the input in other
/// framings: whole, in thirds, and a byte per frame; and the one-pass parse of plain bodies,
/// [`crate::envelope::parse_plain`], against the scanner.
pub fn envelope(data: &[u8]) {
    use crate::envelope::{Envelope, EnvelopeError, Scanner};
    use bytes::Bytes;
    type Outcome = Result<(String, Vec<u8>), EnvelopeError>;
    fn outcome(r: Result<Envelope, EnvelopeError>) -> Outcome {
        r.map(|e| {
            assert_eq!(e.request.first().map(|b| b[0]), Some(b'{'));
            (
                e.access_key,
                e.request.iter().flat_map(|b| b.to_vec()).collect(),
            )
        })
    }
    fn framed(parts: &[&[u8]]) -> Outcome {
        let mut scanner = Scanner::new();
        for part in parts {
            scanner.feed(&Bytes::copy_from_slice(part))?;
        }
        outcome(scanner.finish())
    }
    let ours = framed(&[data]);
    // The one-pass parse of plain bodies never decides: what it takes, the scanner takes alike.
    if let Some(plain) = crate::envelope::parse_plain(&Bytes::copy_from_slice(data)) {
        assert_eq!(plain.request.len(), 1);
        assert_eq!(plain.body_len, data.len());
        assert_eq!(Some(&outcome(Ok(plain)).unwrap()), ours.as_ref().ok());
    }
    let (a, b) = (data.len() / 3, 2 * data.len() / 3);
    let thirds = framed(&[&data[..a], &data[a..b], &data[b..]]);
    assert_eq!(ours.as_ref().ok(), thirds.as_ref().ok());
    assert_eq!(ours.is_ok(), thirds.is_ok());
    if data.len() <= 4096 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let single = framed(&bytes);
        assert_eq!(ours.as_ref().ok(), single.as_ref().ok());
        assert_eq!(ours.is_ok(), single.is_ok());
    }
    match (reference_envelope(data), ours) {
        (Ok((key, request)), Ok((our_key, our_request))) => {
            assert_eq!(key, our_key);
            assert_eq!(request.get().as_bytes(), &our_request[..]);
        }
        (Ok(_), Err(e)) => {
            // Stricter than serde_json in two ways only: invalid UTF-8 (which serde_json lets
            // through in strings it skips) and the array form of a struct.
            let array = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            assert!(
                std::str::from_utf8(data).is_err() || array,
                "refused what serde_json accepts: {e}"
            );
        }
        (Err(e), Ok(_)) => panic!("accepted what serde_json refuses: {e}"),
        (Err(_), Err(_)) => {}
    }
}

/// The envelope as `serde_json` parses it into a borrowing struct: the reference the streaming
/// parser is checked against.
pub fn reference_envelope(
    body: &[u8],
) -> Result<(std::borrow::Cow<'_, str>, &serde_json::value::RawValue), String> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "accessKey", borrow, default)]
        access_key: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        request: Option<&'a serde_json::value::RawValue>,
    }
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let key = env.access_key.ok_or("missing accessKey")?;
    let request = env.request.ok_or("missing request")?;
    if !request.get().starts_with('{') {
        return Err("request must be a JSON object".into());
    }
    Ok((key, request))
}

/// API key parsing, and the whole `Authorization` check against an index.
pub fn api_key(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(parsed) = crate::auth::key::parse(text) {
            assert_eq!(parsed.full, text);
            assert_eq!(&text[4..4 + crate::auth::key::ID_LEN], parsed.id);
        }
    }
    if let Ok(header) = http::HeaderValue::from_bytes(data) {
        // An empty index knows no key: whatever the header holds, it is refused.
        let index = crate::auth::AuthIndex::default();
        assert!(index.authenticate(Some(&header), 0).is_err());
    }
}

/// The configuration parser and validator.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_str(
            text,
            "fuzz input",
            std::path::Path::new("/nonexistent-fuzz-base"),
            &Default::default(),
        );
    }
}
