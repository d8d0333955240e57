#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzz::auth_challenge(data));
