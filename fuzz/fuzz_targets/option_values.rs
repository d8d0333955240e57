#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| spank_berth::fuzz::option_values(data));
