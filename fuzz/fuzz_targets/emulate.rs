//! The emulation fallback (src/emulate): random instruction bytes and vCPU states
//! against a fake vCPU and fake guest RAM. Any guest can reach this code on
//! purpose: it must not panic, must stay inside guest RAM, and a faulting
//! instruction must change nothing (checked in `wbvmm::emulate::fuzzing::run`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wbvmm::emulate::fuzzing::run(data);
});
