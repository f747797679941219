//! RTL8139 register/DMA/RX fuzz target; the op decoding lives in
//! `wbvmm_devices::net::rtl8139::fuzzing` so unit tests can replay findings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wbvmm_devices::net::rtl8139::fuzzing::run(data);
});
