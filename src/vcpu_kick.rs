//! Kicking a vCPU thread out of KVM_RUN: `immediate_exit` plus one signal.
//!
//! A signal alone races: sent after the thread checked its stop flag but before it
//! entered KVM_RUN, it is handled in user space and KVM_RUN then runs the guest on.
//! So each vCPU thread's handler also sets `kvm_run.immediate_exit = 1`
//! (KVM_CAP_IMMEDIATE_EXIT, required by `crate::kvm`): KVM_RUN entered after the
//! signal returns EINTR at once (having completed any pending I/O). The run loop
//! clears the flag after such an exit and checks its stop flag and statistics
//! requests. One kick is therefore enough, whenever it lands; the kicker sets what
//! it wants seen (the stop flag, a statistics request) before kicking.

use std::cell::Cell;
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

#[derive(Debug, Error)]
pub enum KickError {
    #[error("cannot install the vCPU kick signal handler (SIGRTMIN)")]
    Handler(#[source] std::io::Error),
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, while [`arm`]ed.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a store: async-signal-safe.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `arm` stored a pointer to this thread's vCPU kvm_run mapping,
            // which lives until the `Armed` guard (dropped before the VcpuFd) clears it.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// Install the kick handler (process-wide; idempotent). Before any vCPU thread runs.
pub fn install() -> Result<(), KickError> {
    register_signal_handler(SIGRTMIN(), on_kick)
        .map_err(|e| KickError::Handler(std::io::Error::from_raw_os_error(e.errno())))
}

/// While alive, a kick to this thread sets `vcpu`'s `immediate_exit`. Keep it
/// shorter-lived than `vcpu`.
pub struct Armed(());

/// Called by the vCPU thread before its first KVM_RUN.
pub fn arm(vcpu: &mut VcpuFd) -> Armed {
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|p| p.set(run));
    Armed(())
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = KVM_RUN.try_with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Kick one vCPU thread, once. A thread that already ended is not an error.
pub fn kick<T>(thread: &JoinHandle<T>) {
    if !thread.is_finished() {
        let _ = thread.kill(SIGRTMIN());
    }
}

/// Kick the thread `thread`, once: for a caller that keeps the thread's id, not its
/// handle, and knows (under its own lock) that the thread has not ended yet.
pub fn kick_pthread(thread: libc::pthread_t) {
    // SAFETY: the caller guarantees `thread` is a live thread of this process; the
    // handler only sets immediate_exit.
    unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use kvm_ioctls::{Kvm, VmFd};
    use vm_memory::{Bytes, GuestAddress};

    use crate::memory::guest_ram::GuestRam;

    /// Real-mode code at 0x1000: `jmp $`. The guest never exits by itself.
    const SPIN_AT: u64 = 0x1000;

    fn kvm_or_skip(test: &str) -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) if std::env::var("WBVMM_ALLOW_NO_KVM").as_deref() == Ok("1") => {
                eprintln!(
                    "\n!!! SKIPPED {test}: cannot open /dev/kvm ({e}); nothing was tested !!!\n"
                );
                None
            }
            Err(e) => panic!(
                "{test}: cannot open /dev/kvm ({e}); set WBVMM_ALLOW_NO_KVM=1 to skip loudly"
            ),
        }
    }

    /// A VM whose vCPUs spin forever in real mode (no irqchip: every vCPU runs).
    fn spinning_vm(kvm: &Kvm) -> (Arc<VmFd>, GuestRam) {
        let vm = Arc::new(crate::kvm::create_vm(kvm).unwrap());
        let ram = GuestRam::allocate(8 << 20).unwrap();
        ram.mem
            .write_slice(&[0xeb, 0xfe], GuestAddress(SPIN_AT))
            .unwrap();
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: ram.ranges[0].1,
            userspace_addr: ram.host_base(),
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM in every test below (dropped after it).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        (vm, ram)
    }

    fn spinning_vcpu(vm: &VmFd, id: u64) -> VcpuFd {
        let vcpu = vm.create_vcpu(id).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = SPIN_AT;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        vcpu
    }

    /// The race a bare signal loses, made certain: the kick lands before the thread
    /// enters KVM_RUN. With `immediate_exit` KVM_RUN returns EINTR at once; without
    /// it the guest would spin forever (and the deadline below fail the test).
    #[test]
    fn a_kick_before_kvm_run_still_stops_it() {
        let Some(kvm) = kvm_or_skip("a_kick_before_kvm_run_still_stops_it") else {
            return;
        };
        install().unwrap();
        let (vm, _ram) = spinning_vm(&kvm);
        let mut vcpu = spinning_vcpu(&vm, 0);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _armed = arm(&mut vcpu);
            // SAFETY: pthread_self/pthread_kill on this very thread; the handler only
            // sets immediate_exit.
            unsafe { libc::pthread_kill(libc::pthread_self(), SIGRTMIN()) };
            let r = vcpu.run().map(|e| format!("{e:?}"));
            let _ = done_tx.send(r.map_err(|e| e.errno()));
        });
        let r = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("KVM_RUN did not return: the kick was lost");
        assert_eq!(r, Err(libc::EINTR));
        t.join().unwrap();
    }

    /// Threads running the real run loop, each kicked exactly once at a different
    /// moment, all stop.
    #[test]
    fn one_kick_stops_a_running_vcpu_thread() {
        let Some(kvm) = kvm_or_skip("one_kick_stops_a_running_vcpu_thread") else {
            return;
        };
        install().unwrap();
        let (vm, _ram) = spinning_vm(&kvm);
        for round in 0..16u64 {
            let mut vcpu = spinning_vcpu(&vm, round);
            let stop = Arc::new(AtomicBool::new(false));
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let flag = stop.clone();
            let t = std::thread::spawn(move || {
                let _armed = arm(&mut vcpu);
                let mut runs = 0u64;
                // The run loop's shape (`vcpu::run_loop`): check the flag, run,
                // clear immediate_exit after an EINTR.
                while !flag.load(Ordering::Acquire) {
                    runs += 1;
                    match vcpu.run() {
                        Err(e) if e.errno() == libc::EINTR => vcpu.set_kvm_immediate_exit(0),
                        other => panic!("unexpected exit {:?}", other.map(|e| format!("{e:?}"))),
                    }
                }
                let _ = done_tx.send(runs);
            });
            // Kick at a different point of the thread's life each round, from
            // before its first KVM_RUN to well inside it.
            std::thread::sleep(Duration::from_micros(round * round * 40));
            stop.store(true, Ordering::Release);
            kick(&t);
            let runs = done_rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("round {round}: one kick did not stop the vCPU"));
            assert!(runs <= 2, "round {round}: {runs} KVM_RUNs for one kick");
            t.join().unwrap();
        }
    }
}
