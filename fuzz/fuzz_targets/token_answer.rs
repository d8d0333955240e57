#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzz::token_answer(data));
