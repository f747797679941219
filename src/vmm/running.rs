//! A running VM: waiting for its end (woken, never polling), statistics snapshots
//! of the running VM, and stopping the vCPU threads.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use super::Vmm;
use crate::io_thread::{IoThread, Wake};
use crate::run_report::{ReportSources, RunReport};
use crate::vcpu::{self, VcpuStats, VmOutcome};
use crate::vcpu_kick;

/// A running VM: its threads and shared state.
pub struct RunningVm {
    pub vmm: Vmm,
    pub(super) threads: Vec<JoinHandle<VcpuStats>>,
    pub tids: Vec<i32>,
    pub(super) io: Option<IoThread>,
    pub(super) setup_time: std::time::Duration,
    /// Kept so that `wake_rx` never disconnects, and for `request_stop`.
    pub(super) wake_tx: Sender<Wake>,
    pub(super) wake_rx: Receiver<Wake>,
}

impl RunningVm {
    /// Wait until the VM ends, stop every thread, and report. `on_snapshot` gets a
    /// report of the running VM each time SIGUSR1 arrives.
    pub fn wait_with(mut self, on_snapshot: &dyn Fn(&RunReport)) -> RunReport {
        let outcome = self.wait_for_end(on_snapshot);
        self.stop_vcpus();
        let per_vcpu: Vec<VcpuStats> = self
            .threads
            .drain(..)
            .filter_map(|h| h.join().ok())
            .collect();
        let io_tid = self.io.as_ref().map(|io| io.tid).unwrap_or(0);
        if let Some(io) = self.io.take() {
            io.stop();
        }
        if let Some(ring) = &self.vmm.coalesced {
            let _ = vcpu::replay_coalesced(ring, &self.vmm.pio, &self.vmm.mmio);
        }
        self.vmm.serial.flush_output();
        self.report(Some(outcome), &per_vcpu, io_tid)
    }

    pub fn wait(self) -> RunReport {
        self.wait_with(&|_| {})
    }

    /// Sleep until something ends the VM (every path that sets the outcome also
    /// wakes this thread), serving snapshot requests meanwhile.
    fn wait_for_end(&self, on_snapshot: &dyn Fn(&RunReport)) -> VmOutcome {
        let never = || false;
        loop {
            // `finish` stores the outcome before it raises the stop flag, so this
            // `wait` returns at once.
            if self.vmm.exit.stopping() {
                if let Some(o) = self.vmm.exit.wait(&never, &never) {
                    return o;
                }
            }
            match self.wake_rx.recv() {
                Ok(Wake::Snapshot) => on_snapshot(&self.snapshot()),
                Ok(Wake::Ended) => {}
                Ok(Wake::NicShadow) => {
                    if let Some(s) = self.vmm.nic_shadow() {
                        s.remap();
                    }
                    // Unmapped after a reset to C mode: writes may be posted again.
                    if let Some(p) = self.vmm.nic_posted() {
                        p.follow();
                    }
                }
                // Cannot happen (`wake_tx` lives in self); wait for the outcome.
                Err(_) => {
                    return self
                        .vmm
                        .exit
                        .wait(&never, &never)
                        .unwrap_or(VmOutcome::UserQuit)
                }
            }
        }
    }

    /// Ask every vCPU for a copy of its statistics (one kick each, so it answers
    /// after its current exit) and report the running VM.
    pub fn snapshot(&self) -> RunReport {
        let mb = &self.vmm.mailbox;
        let req = mb.request.fetch_add(1, Ordering::SeqCst) + 1;
        for h in &self.threads {
            vcpu_kick::kick(h);
        }
        // The answers arrive in the mailbox; its deadline only covers a vCPU stuck
        // in a long exit (the report then lacks that vCPU's latest counts).
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        loop {
            let done = {
                let slots = mb.slots.lock().unwrap_or_else(|e| e.into_inner());
                (0..self.tids.len() as u32).all(|i| slots.get(&i).is_some_and(|(r, _)| *r >= req))
            };
            if done
                || self.threads.iter().all(|h| h.is_finished())
                || std::time::Instant::now() > deadline
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let per_vcpu: Vec<VcpuStats> = mb
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(_, s)| s.clone())
            .collect();
        self.report(
            None,
            &per_vcpu,
            self.io.as_ref().map(|io| io.tid).unwrap_or(0),
        )
    }

    fn report(&self, outcome: Option<VmOutcome>, per_vcpu: &[VcpuStats], io_tid: i32) -> RunReport {
        let vmm = &self.vmm;
        let sources = ReportSources {
            memory: &vmm.memory,
            net: vmm.net.as_deref(),
            kvm_stats: vmm.kvm_stats.as_ref(),
            serial_irq: &vmm.serial_irq,
            tids: &self.tids,
            setup_time: self.setup_time,
            ram: &vmm.ram.mem,
            symbols: &vmm.symbols,
        };
        sources.report(outcome, per_vcpu, io_tid)
    }

    /// The stop flag is up: one kick takes each vCPU out of KVM_RUN to see it
    /// (`vcpu_kick` says why one is enough).
    fn stop_vcpus(&self) {
        for h in &self.threads {
            vcpu_kick::kick(h);
        }
    }

    pub fn request_stop(&self, outcome: VmOutcome) {
        self.vmm.exit.finish(outcome);
        let _ = self.wake_tx.send(Wake::Ended);
    }
}
