//! `wbvmm stats FILE`: a [`VmStats`] as readable, aligned tables.

use std::fmt::Write;

use super::schema::{DeviceExits, Net, VmStats};
use super::table::{
    bytes, cells, group, human_ns, indented, kv, ns, percent, section, table, HEADER,
    HEADER_AND_FOOTER,
};
use crate::exit_kind::{Counted, EXIT_KINDS};
use crate::kvm_stats::KvmStats;
use crate::memory::{IndexStats, MemoryStats};

/// How many `exits_by_device` rows to show.
const TOP_DEVICES: usize = 10;

/// Render the statistics as text tables (ends with a newline).
pub fn render(s: &VmStats) -> String {
    let mut out = String::new();
    run_section(s, &mut out);
    vcpus_section(s, &mut out);
    exits_section(s, &mut out);
    devices_section(&s.exits_by_device, &mut out);
    emulated_section(s, &mut out);
    section("Interrupts", &mut out);
    let i = &s.interrupts;
    table(
        &[kv("serial", group(i.serial)), kv("nic", group(i.nic))],
        &[false, true],
        Default::default(),
        &mut out,
    );
    memory_section(&s.memory, &mut out);
    if let Some(n) = &s.net {
        net_section(n, &mut out);
    }
    if let Some(k) = &s.kvm {
        section("KVM statistics (nonzero counters)", &mut out);
        kvm_counters("vm", &k.vm, &mut out);
        kvm_counters("vcpu", &k.vcpu, &mut out);
    }
    out
}

fn run_section(s: &VmStats, out: &mut String) {
    section("Run", out);
    let ids = |t: &[i32]| t.iter().map(i32::to_string).collect::<Vec<_>>().join(" ");
    let rows = [
        kv("outcome", s.outcome.as_str()),
        kv(
            "exit code",
            s.exit_code.map_or("-".into(), |c| c.to_string()),
        ),
        kv(
            "setup",
            format!(
                "{} us ({})",
                group(s.setup_us),
                human_ns(s.setup_us as f64 * 1e3)
            ),
        ),
        kv("RSS overhead", bytes(s.rss_overhead_bytes)),
        // Thread ids are identifiers: no thousands separators.
        kv("vCPU threads", ids(&s.threads.vcpu)),
        kv("I/O thread", s.threads.io.to_string()),
    ];
    table(&rows, &[false, false], Default::default(), out);
}

/// Where each vCPU was: RIP, CPL and the kernel function.
fn vcpus_section(s: &VmStats, out: &mut String) {
    if s.vcpus.is_empty() {
        return;
    }
    section("vCPUs", out);
    let mut rows = vec![cells(&["vCPU", "RIP", "CPL", "symbol"])];
    for v in &s.vcpus {
        rows.push(vec![
            v.id.to_string(),
            format!("{:#x}", v.rip),
            v.cpl.to_string(),
            v.symbol.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows, &[false, false, true, false], HEADER, out);
}

/// One row per exit kind of the table, with its handling time where it is timed.
fn exits_section(s: &VmStats, out: &mut String) {
    section("Exits", out);
    let total = s.exits.total();
    let mut rows = vec![cells(&[
        "kind", "count", "share", "timed", "mean", "p50", "p99", "max",
    ])];
    // Each exit kind, with the kinds that are a part of it indented under it.
    let wholes = EXIT_KINDS.iter().filter(|r| r.counted == Counted::Exit);
    for whole in wholes {
        let parts = EXIT_KINDS
            .iter()
            .filter(|r| r.counted == Counted::PartOf(whole.kind));
        for r in std::iter::once(whole).chain(parts) {
            let n = s.exits.get(r.kind);
            let mut row = match r.counted {
                Counted::Exit => vec![r.name.to_string(), group(n), percent(n, total)],
                Counted::PartOf(_) => vec![format!("  {}", r.name), group(n), String::new()],
            };
            match s.exit_latency.get(&r.kind) {
                Some(l) => row.extend([
                    group(l.count),
                    ns(l.mean_ns),
                    l.p50_ns.map_or_else(|| "-".into(), ns),
                    l.p99_ns.map_or_else(|| "-".into(), ns),
                    l.max_ns.map_or_else(|| "-".into(), ns),
                ]),
                None => row.extend(std::iter::repeat_n(String::new(), 5)),
            }
            rows.push(row);
        }
    }
    let mut footer = vec!["total".to_string(), group(total)];
    footer.extend(std::iter::repeat_n(String::new(), 6));
    rows.push(footer);
    let mut right = vec![false];
    right.extend([true; 7]);
    table(&rows, &right, HEADER_AND_FOOTER, out);
}

fn devices_section(devices: &[DeviceExits], out: &mut String) {
    if devices.is_empty() {
        return;
    }
    let mut entries: Vec<&DeviceExits> = devices.iter().collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.count));
    let total = entries.iter().map(|e| e.count).fold(0, u64::saturating_add);
    if entries.len() > TOP_DEVICES {
        section(
            &format!("Exits by device (top {TOP_DEVICES} of {})", entries.len()),
            out,
        );
    } else {
        section("Exits by device", out);
    }
    let mut rows = vec![cells(&["bus", "device", "offset", "count", "share"])];
    for e in entries.iter().take(TOP_DEVICES) {
        rows.push(vec![
            e.bus.clone(),
            e.device.clone(),
            format!("{:#x}", e.offset),
            group(e.count),
            percent(e.count, total),
        ]);
    }
    table(&rows, &[false, false, true, true, true], HEADER, out);
}

/// The emulation fallback: instructions by mnemonic, most frequent first.
fn emulated_section(s: &VmStats, out: &mut String) {
    if s.emulated.is_empty() {
        return;
    }
    section(
        "Emulation fallbacks (instructions KVM's emulator could not run)",
        out,
    );
    let mut entries: Vec<_> = s.emulated.iter().collect();
    entries.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let total = entries
        .iter()
        .map(|e| e.1.count)
        .fold(0, u64::saturating_add);
    let mut rows = vec![cells(&["mnemonic", "count", "share", "total", "mean"])];
    for (name, c) in &entries {
        let mean = match c.count {
            0 => String::new(),
            n => human_ns(c.total_ns as f64 / n as f64),
        };
        rows.push(vec![
            name.to_string(),
            group(c.count),
            percent(c.count, total),
            ns(c.total_ns),
            mean,
        ]);
    }
    let mut footer = vec!["total".to_string(), group(total)];
    footer.extend(std::iter::repeat_n(String::new(), 3));
    rows.push(footer);
    table(
        &rows,
        &[false, true, true, true, true],
        HEADER_AND_FOOTER,
        out,
    );
}

fn memory_section(m: &MemoryStats, out: &mut String) {
    section("Memory", out);
    let rows = [
        kv(
            "slot_index",
            m.slot_index.map_or("-".into(), |k| k.name().to_string()),
        ),
        kv("slots", group(m.slots as u64)),
        kv("generation", group(m.generation)),
    ];
    table(&rows, &[false, false], Default::default(), out);

    out.push_str("  slot-index lookups\n");
    let mut rows = vec![cells(&[
        "source",
        "index",
        "lookups",
        "hits",
        "misses",
        "mean_nodes",
        "max_nodes",
    ])];
    let lookup_row = |source: &str, s: &IndexStats| {
        vec![
            source.to_string(),
            s.index.map_or("-".into(), |k| k.name().to_string()),
            group(s.lookups),
            group(s.hits),
            group(s.misses),
            format!("{:.2}", s.mean_nodes),
            group(u64::from(s.max_nodes)),
        ]
    };
    rows.push(lookup_row("exit", &m.lookups.exit));
    rows.push(lookup_row("dma", &m.lookups.dma));
    indented(
        4,
        &rows,
        &[false, false, true, true, true, true, true],
        HEADER,
        out,
    );

    let c = &m.miss_cache;
    out.push_str("  MMIO-miss cache\n");
    let rows = [
        kv("enabled", c.enabled.to_string()),
        kv("entries", group(c.entries as u64)),
        kv("hits", group(c.hits)),
        kv("misses", group(c.misses)),
        kv("invalidations", group(c.invalidations)),
        kv("hit rate", percent(c.hits, c.hits.saturating_add(c.misses))),
    ];
    indented(4, &rows, &[false, false], Default::default(), out);

    let r = &m.mmio;
    out.push_str("  MMIO routing\n");
    let rows = [
        kv("exits", group(r.exits)),
        kv("device", group(r.device)),
        kv("unmapped_reads", group(r.unmapped_reads)),
        kv("unmapped_writes", group(r.unmapped_writes)),
        kv("readonly_writes", group(r.readonly_writes)),
    ];
    indented(4, &rows, &[false, false], Default::default(), out);
}

fn net_section(n: &Net, out: &mut String) {
    section("Network", out);
    let rows = [
        kv("tap", n.tap.as_str()),
        kv("rx_packets", group(n.rx_packets)),
        kv("rx_bytes", bytes(n.rx_bytes)),
        kv("tx_packets", group(n.tx_packets)),
        kv("tx_bytes", bytes(n.tx_bytes)),
        kv("rx_filtered", group(n.rx_filtered)),
        kv("rx_ring_full", group(n.rx_ring_full)),
        kv("rx_disabled", group(n.rx_disabled)),
        kv("rx_backpressure", group(n.rx_backpressure)),
        kv("tx_dropped", group(n.tx_dropped)),
        kv("tap_rx_frames", group(n.tap_rx_frames)),
        kv("tap_errors", group(n.tap_errors)),
    ];
    table(&rows, &[false, false], Default::default(), out);
}

/// KVM's nonzero scalar counters, largest first (histograms left out).
fn kvm_counters(name: &str, stats: &KvmStats, out: &mut String) {
    let scalars = stats.0.values().filter(|v| v.as_u64().is_some()).count();
    let mut shown: Vec<(&str, u64)> = stats.nonzero_scalars().collect();
    shown.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(
        out,
        "  {name}: {} of {scalars} counters nonzero",
        shown.len()
    );
    let rows: Vec<Vec<String>> = shown.iter().map(|(n, v)| kv(n, group(*v))).collect();
    indented(4, &rows, &[false, true], Default::default(), out);
}

#[cfg(test)]
mod tests;
