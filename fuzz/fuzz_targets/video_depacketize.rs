#![no_main]
// Body in whipgate::fuzzing, shared with tests/fuzz_regressions.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| whipgate::fuzzing::video_depacketize(data));
