#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| modelgate::fuzzing::api_key(data));
