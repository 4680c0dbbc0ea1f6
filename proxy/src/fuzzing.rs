//! Entry points for the fuzz targets in `fuzz/` and for replaying their corpora as ordinary
//! tests (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must not panic, hang or
//! allocate without bound; the asserts are the properties a fuzzer should break if it can.

/// The prediction envelope parser.
pub fn envelope(data: &[u8]) {
    if let Ok((key, request)) = crate::predict::parse_envelope(data) {
        assert!(request.get().starts_with('{'));
        // The borrowed request is a slice of the input (the body is held once).
        let start = request.get().as_ptr() as usize;
        let base = data.as_ptr() as usize;
        assert!(start >= base && start + request.get().len() <= base + data.len());
        let _ = key.len();
    }
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
