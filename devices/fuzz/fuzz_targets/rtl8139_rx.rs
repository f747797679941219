//! See `wbvmm_devices::net::rtl8139::fuzzing_rx`: the harness lives in the crate so
//! the unit tests replay the stored corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wbvmm_devices::net::rtl8139::fuzzing_rx::run(data);
});
