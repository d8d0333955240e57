#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzz::registry_error(data));
