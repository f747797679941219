use super::*;
use crate::exit_kind::ExitKind;
use serde_json::json;

/// A full file, as JSON (so the sample also checks reading back).
fn sample() -> VmStats {
    let devices: Vec<serde_json::Value> = (0..12)
        .map(|i| json!({"bus": if i % 2 == 0 { "pio" } else { "mmio" }, "device": format!("dev{i}"), "offset": i * 4, "count": 1000 - i * 10}))
        .collect();
    serde_json::from_value(json!({
        "outcome": "Shutdown",
        "exit_code": 0,
        "setup_us": 12345,
        "rss_overhead_bytes": 5_242_880u64,
        "threads": {"vcpu": [4101, 4102], "io": 4100},
        "exits": {"io_in": 1200, "io_out": 3400, "mmio_read": 10, "mmio_write": 20,
                  "unclaimed_pio": 5, "hlt": 0, "interrupted": 7, "internal_error": 2,
                  "int3_injected": 1, "other": 1},
        "exit_latency": {
            "io_out": {"count": 3400, "mean_ns": 850, "p50_ns": 700, "p99_ns": 4500, "max_ns": 2_500_000},
            "mmio_read": {"count": 10, "mean_ns": 2000, "p50_ns": 1900, "p99_ns": 3000, "max_ns": 3100}
        },
        "exits_by_device": devices,
        "emulated": {},
        "interrupts": {"serial": 42, "nic": 7},
        "memory": {
            "slot_index": "wbtree", "slots": 3, "generation": 5,
            "lookups": {"exit": {"index": "wbtree", "lookups": 30, "hits": 30, "misses": 0, "nodes_total": 60, "mean_nodes": 2.0, "max_nodes": 3},
                        "dma": {"index": "wbtree", "lookups": 900, "hits": 899, "misses": 1, "nodes_total": 1800, "mean_nodes": 2.0, "max_nodes": 2}},
            "miss_cache": {"enabled": true, "entries": 4, "hits": 75, "misses": 25, "invalidations": 2},
            "mmio": {"exits": 30, "device": 28, "unmapped_reads": 1, "unmapped_writes": 1, "readonly_writes": 0}
        },
        "net": {"tap": "wb0", "rx_packets": 10, "tx_packets": 11, "rx_bytes": 1500, "tx_bytes": 2048,
                "rx_ring_full": 0, "rx_backpressure": 3, "tap_errors": 0, "rx_filtered": 2},
        "kvm": {"vm": {"remote_tlb_flush": 12, "pages_4k": 0, "lpages": 4},
                "vcpu": {"exits": 5000, "io_exits": 4600, "halt_exits": 0, "halt_poll_fail_hist": [1, 2, 3]}}
    }))
    .unwrap()
}

fn has_line(s: &str, parts: &[&str]) -> bool {
    s.lines().any(|l| {
        let mut rest = l;
        parts.iter().all(|p| match rest.find(p) {
            Some(i) => {
                rest = &rest[i + p.len()..];
                true
            }
            None => false,
        })
    })
}

#[test]
fn full_sample() {
    let s = render(&sample());
    println!("{s}");
    for (parts, what) in [
        (&["outcome", "Shutdown"][..], "outcome"),
        (&["setup", "12,345 us", "12.35 ms"], "setup"),
        (&["RSS overhead", "5,242,880", "5.0 MiB"], "rss"),
        (&["vCPU threads", "4101 4102"], "vcpu tids"),
        (&["I/O thread", "4100"], "io tid"),
        (
            &[
                "kind", "count", "share", "timed", "mean", "p50", "p99", "max",
            ],
            "exit header",
        ),
        (
            &[
                "io_out", "3,400", "73.3%", "3,400", "850 ns", "700 ns", "4.5 us", "2.50 ms",
            ],
            "io_out",
        ),
        (&["io_in", "1,200"], "io_in"),
        (&["  unclaimed_pio", "5"], "a part"),
        (&["internal_error", "2"], "internal errors"),
        // Parts are left out of the total: 1200+3400+10+20+0+7+2+1.
        (&["total", "4,640"], "total"),
        (&["Exits by device (top 10 of 12)"], "device title"),
        (&["pio", "dev0", "0x0", "1,000"], "top device"),
        (&["serial", "42"], "interrupts"),
        (&["slot_index", "wbtree"], "slot index"),
        (
            &["dma", "wbtree", "900", "899", "1", "2.00", "2"],
            "dma lookups",
        ),
        (&["hit rate", "75.0%"], "miss cache"),
        (&["unmapped_reads", "1"], "mmio"),
        (&["tap", "wb0"], "tap"),
        (&["tx_bytes", "2,048", "2.0 KiB"], "tx bytes"),
        (&["rx_backpressure", "3"], "backpressure"),
        (&["vm: 2 of 3 counters nonzero"], "kvm vm"),
        (&["remote_tlb_flush", "12"], "kvm tlb"),
        (&["vcpu: 2 of 3 counters nonzero"], "kvm vcpu"),
        (&["exits", "5,000"], "kvm exits"),
    ] {
        assert!(
            has_line(&s, parts),
            "{what}: no line with {parts:?} in\n{s}"
        );
    }
    // Only 10 devices, zero KVM counters and histograms hidden, nothing emulated.
    assert!(!s.contains("dev10") && !s.contains("dev11"), "{s}");
    assert!(s.contains("dev9"), "{s}");
    assert!(
        !s.contains("pages_4k")
            && !s.contains("halt_exits")
            && !s.contains("halt_poll_fail_hist")
            && !s.contains("Emulation"),
        "{s}"
    );
    // Every exit kind of the table has a row, parts right under their whole.
    for r in &EXIT_KINDS {
        assert!(s.contains(r.name), "no {} row in\n{s}", r.name);
    }
    let rows: Vec<&str> = s.lines().map(str::trim_start).collect();
    let at = |name: &str| rows.iter().position(|l| l.starts_with(name)).unwrap();
    assert_eq!(at("unclaimed_pio"), at("io_in") + 1, "{s}");
    assert_eq!(at("int3_injected"), at("internal_error") + 1, "{s}");
    // Columns line up: every row of the exits table has "share" ending at the same column.
    let hdr = s.lines().find(|l| l.contains("share")).unwrap();
    let end = hdr.find("share").unwrap() + "share".len();
    let row = s
        .lines()
        .find(|l| l.trim_start().starts_with("io_out"))
        .unwrap();
    assert_eq!(&row[end - 1..end], "%", "{hdr}\n{row}");
}

#[test]
fn a_file_round_trips_through_the_types() {
    let s = sample();
    let text = serde_json::to_string_pretty(&s).unwrap();
    let back: VmStats = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.exits.get(ExitKind::InternalError), 2);
    assert_eq!(back.get("exits.io_out"), Some(json!(3400)));
    assert_eq!(back.get("threads.vcpu.1"), Some(json!(4102)));
    assert_eq!(back.get("net.tap"), Some(json!("wb0")));
    assert_eq!(back.get("kvm.vcpu.exits"), Some(json!(5000)));
    assert_eq!(back.get("exits.warp"), None);
    assert_eq!(back.get("threads.vcpu.2"), None);
    assert_eq!(back.get("outcome.x"), None);
}

/// `scripts/tcp-rr.sh` renders the difference of two snapshots around a Linux
/// guest's netperf run: counts and means, no percentiles or maxima.
#[test]
fn a_difference_of_snapshots_renders_its_means_and_no_percentiles() {
    let diff: VmStats = serde_json::from_value(json!({
        "outcome": "netperf's run",
        "exits": {"mmio_write": 6000, "io_in": 30},
        "exit_latency": {"mmio_write": {"count": 6000, "mean_ns": 6100}},
    }))
    .unwrap();
    let s = render(&diff);
    assert!(
        has_line(
            &s,
            &["mmio_write", "6,000", "6,000", "6.1 us", "-", "-", "-"]
        ),
        "{s}"
    );
    let back = serde_json::to_value(diff.exit_latency).unwrap();
    assert_eq!(back["mmio_write"], json!({"count": 6000, "mean_ns": 6100}));
}

#[test]
fn older_files_render_and_wrong_ones_say_where() {
    // A file without the newer parts (no internal_error, no memory, net or kvm).
    let old: VmStats = serde_json::from_value(json!({
        "outcome": "DebugExit(0)", "exit_code": 0,
        "exits": {"io_in": 8, "io_out": 1, "other": 0},
        "exit_latency": {"other": {"count": 1, "mean_ns": 5, "p50_ns": 5, "p99_ns": 5, "max_ns": 5}},
    }))
    .unwrap();
    let s = render(&old);
    assert!(has_line(&s, &["internal_error", "0"]), "{s}");
    assert!(has_line(&s, &["total", "9"]), "{s}");
    assert!(
        !s.contains("Network") && !s.contains("KVM statistics"),
        "{s}"
    );
    assert!(render(&VmStats::default()).contains("Exits"));

    for (bad, says) in [
        (
            json!({"exit_code": "zero"}),
            "invalid type: string \"zero\"",
        ),
        (json!({"exits": {"warp": 1}}), "unknown exit kind `warp`"),
        (json!({"threads": {"vcpu": 5}}), "invalid type: integer `5`"),
    ] {
        let e = serde_json::from_value::<VmStats>(bad).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
}

#[test]
fn emulation_fallbacks_are_listed_by_count() {
    let s = VmStats {
        emulated: serde_json::from_value(json!({
            "popcnt": {"count": 4, "total_ns": 4000},
            "cmpxchg16b": {"count": 12, "total_ns": 36000},
        }))
        .unwrap(),
        ..Default::default()
    };
    let s = render(&s);
    let a = s.find("cmpxchg16b").expect("cmpxchg16b row");
    let b = s.find("popcnt").expect("popcnt row");
    assert!(a < b, "most frequent first\n{s}");
    assert!(s.contains("3.0 us") && s.contains("75.0%"), "{s}");
}
