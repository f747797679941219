//! See `wbvmm_devices::pci::fuzzing_config`: the harness lives in the crate so
//! the unit tests replay the stored corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wbvmm_devices::pci::fuzzing_config::run(data);
});
