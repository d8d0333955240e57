#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| spank_berth::fuzz::plugstack_args(data));
