//! PCI root fuzz target (config mechanism #1, BAR sizing/moving, decode enables).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wbvmm_devices::pci::fuzzing::run(data);
});
