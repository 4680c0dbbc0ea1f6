#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| replica_runtime::fuzzing::json_python(data));
