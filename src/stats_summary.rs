//! `wbvmm stats FILE`: the `--stats` JSON as readable, aligned tables.
//!
//! [`summarize`] is deliberately forgiving: every field may be missing or of an unexpected
//! type (older or newer wbvmm, a hand-edited file). Known sections are laid out as tables;
//! anything it does not recognise is still printed, flattened to `a.b.c  value` lines, so
//! new stats show up before this code learns about them. It never panics.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Map, Value};

/// How many `exits_by_device` rows to show.
const TOP_DEVICES: usize = 10;
/// Top-level keys with a section of their own.
const KNOWN: &[&str] = &[
    "outcome",
    "exit_code",
    "setup_us",
    "rss_overhead_bytes",
    "threads",
    "affinity",
    "exits",
    "exit_latency",
    "exits_by_device",
    "emulated",
    "interrupts",
    "memory",
    "net",
    "kvm",
];
const EXIT_KINDS: &[&str] = &[
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "unclaimed_pio",
    "hlt",
    "interrupted",
    "int3_injected",
    "other",
];
const NET_KEYS: &[&str] = &[
    "tap",
    "rx_packets",
    "rx_bytes",
    "tx_packets",
    "tx_bytes",
    "rx_filtered",
    "rx_ring_full",
    "rx_disabled",
    "rx_backpressure",
    "tx_dropped",
    "tap_rx_frames",
    "tap_errors",
];

/// Render wbvmm's `--stats` JSON as text tables (ends with a newline).
pub fn summarize(json: &Value) -> String {
    let mut out = String::new();
    let Some(obj) = json.as_object() else {
        let _ = writeln!(out, "not a wbvmm stats object: {}", short(json, 200));
        return out;
    };
    run_section(obj, &mut out);
    if let Some(v) = obj.get("affinity") {
        flat_section("Affinity", v, &mut out);
    }
    exits_section(obj, &mut out);
    if let Some(v) = obj.get("exits_by_device") {
        devices_section(v, &mut out);
    }
    if let Some(v) = obj.get("emulated") {
        emulated_section(v, &mut out);
    }
    if let Some(v) = obj.get("interrupts") {
        flat_section("Interrupts", v, &mut out);
    }
    if let Some(v) = obj.get("memory") {
        memory_section(v, &mut out);
    }
    if let Some(v) = obj.get("net") {
        net_section(v, &mut out);
    }
    if let Some(v) = obj.get("kvm") {
        kvm_section(v, &mut out);
    }
    let other: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !other.is_empty() {
        flat_section("Other", &Value::Object(other), &mut out);
    }
    if out.is_empty() {
        out.push_str("(no statistics)\n");
    }
    out
}

fn run_section(obj: &Map<String, Value>, out: &mut String) {
    let mut rows = Vec::new();
    if let Some(v) = obj.get("outcome") {
        rows.push(kv("outcome", scalar(v)));
    }
    if let Some(v) = obj.get("exit_code") {
        rows.push(kv("exit code", scalar(v)));
    }
    if let Some(v) = obj.get("setup_us") {
        let s = match as_f64(v) {
            Some(us) => format!("{} us ({})", scalar(v), human_ns(us * 1e3)),
            None => scalar(v),
        };
        rows.push(kv("setup", s));
    }
    if let Some(v) = obj.get("rss_overhead_bytes") {
        rows.push(kv("RSS overhead", bytes(v)));
    }
    match obj.get("threads") {
        Some(Value::Object(t)) => {
            for k in ordered_keys(t, &["vcpu", "io"]) {
                let name = match k {
                    "vcpu" => "vCPU threads".to_string(),
                    "io" => "I/O thread".to_string(),
                    _ => format!("thread {k}"),
                };
                // Thread ids are identifiers: no thousands separators.
                let s = match &t[k] {
                    Value::Array(a) => a.iter().map(raw).collect::<Vec<_>>().join(" "),
                    v => raw(v),
                };
                rows.push(kv(&name, s));
            }
        }
        Some(v) => rows.push(kv("threads", scalar(v))),
        None => {}
    }
    if !rows.is_empty() {
        section("Run", out);
        table(&rows, &[false, false], None, out);
    }
}

fn exits_section(obj: &Map<String, Value>, out: &mut String) {
    let exits = obj.get("exits");
    let lat = obj.get("exit_latency").and_then(Value::as_object);
    if exits.is_none() && obj.get("exit_latency").is_none() {
        return;
    }
    section("Exits", out);
    let exits_obj = exits.and_then(Value::as_object);
    if let Some(v) = exits.filter(|v| !v.is_object()) {
        let _ = writeln!(out, "  exits: {}", short(v, 100));
    }
    if let Some(v) = obj.get("exit_latency").filter(|v| !v.is_object()) {
        let _ = writeln!(out, "  exit_latency: {}", short(v, 100));
    }
    // Kinds: the known order first, then whatever else either object has.
    let mut kinds: Vec<&str> = EXIT_KINDS
        .iter()
        .copied()
        .filter(|k| {
            exits_obj.is_some_and(|e| e.contains_key(*k)) || lat.is_some_and(|l| l.contains_key(*k))
        })
        .collect();
    for m in [exits_obj, lat].into_iter().flatten() {
        for k in m.keys() {
            if !kinds.contains(&k.as_str()) {
                kinds.push(k);
            }
        }
    }
    if kinds.is_empty() {
        return;
    }
    let total: u64 = exits_obj
        .map(|e| {
            e.values()
                .filter_map(Value::as_u64)
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0);
    let mut header = vec!["kind", "count", "share"];
    if lat.is_some() {
        header.extend(["timed", "mean", "p50", "p99", "max"]);
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for k in &kinds {
        let count = exits_obj.and_then(|e| e.get(*k));
        let mut row = vec![
            k.to_string(),
            count.map(scalar).unwrap_or_else(|| "-".into()),
            count
                .and_then(Value::as_u64)
                .map(|c| percent(c, total))
                .unwrap_or_default(),
        ];
        if let Some(lat) = lat {
            match lat.get(*k) {
                Some(Value::Object(l)) => {
                    row.push(l.get("count").map(scalar).unwrap_or_else(|| "-".into()));
                    for f in ["mean_ns", "p50_ns", "p99_ns", "max_ns"] {
                        row.push(l.get(f).map(ns).unwrap_or_else(|| "-".into()));
                    }
                }
                Some(v) => row.extend([
                    short(v, 30),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]),
                None => row.extend(std::iter::repeat_n(String::new(), 5)),
            }
        }
        rows.push(row);
    }
    let footer = exits_obj.map(|_| {
        let mut f = vec!["total".to_string(), group(total), String::new()];
        if lat.is_some() {
            f.extend(std::iter::repeat_n(String::new(), 5));
        }
        f
    });
    let mut right = vec![false];
    right.extend(std::iter::repeat_n(true, header.len() - 1));
    let mut all = rows;
    let has_footer = footer.is_some();
    all.extend(footer);
    table(&all, &right, Some((1, has_footer)), out);
}

fn devices_section(v: &Value, out: &mut String) {
    let Some(list) = v.as_array() else {
        flat_section("Exits by device", v, out);
        return;
    };
    let mut entries: Vec<&Value> = list.iter().collect();
    let count = |e: &Value| e.get("count").and_then(Value::as_u64).unwrap_or(0);
    entries.sort_by_key(|e| std::cmp::Reverse(count(e)));
    let total = entries
        .iter()
        .map(|e| count(e))
        .fold(0u64, u64::saturating_add);
    let title = if entries.len() > TOP_DEVICES {
        format!("Exits by device (top {TOP_DEVICES} of {})", entries.len())
    } else {
        "Exits by device".to_string()
    };
    section(&title, out);
    let mut rows = vec![["bus", "device", "offset", "count", "share"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for e in entries.iter().take(TOP_DEVICES) {
        let get = |k: &str| e.get(k);
        let offset = match get("offset") {
            Some(o) => o
                .as_u64()
                .map(|o| format!("{o:#x}"))
                .unwrap_or_else(|| scalar(o)),
            None => "-".into(),
        };
        let row = if e.is_object() {
            vec![
                get("bus").map(scalar).unwrap_or_else(|| "-".into()),
                get("device").map(scalar).unwrap_or_else(|| "-".into()),
                offset,
                get("count").map(scalar).unwrap_or_else(|| "-".into()),
                percent(count(e), total),
            ]
        } else {
            vec![
                short(e, 40),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]
        };
        rows.push(row);
    }
    table(
        &rows,
        &[false, false, true, true, true],
        Some((1, false)),
        out,
    );
}

/// The emulation fallback: instructions by mnemonic, most frequent first.
fn emulated_section(v: &Value, out: &mut String) {
    let Some(m) = v.as_object() else {
        flat_section("Emulation fallbacks", v, out);
        return;
    };
    if m.is_empty() {
        return;
    }
    section(
        "Emulation fallbacks (instructions KVM's emulator could not run)",
        out,
    );
    let mut entries: Vec<(&String, u64, &Value)> = m
        .iter()
        .map(|(k, e)| (k, e["count"].as_u64().unwrap_or(0), &e["total_ns"]))
        .collect();
    entries.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let total: u64 = entries.iter().map(|e| e.1).sum();
    let mut rows = vec![vec![
        "mnemonic".to_string(),
        "count".to_string(),
        "share".to_string(),
        "total".to_string(),
        "mean".to_string(),
    ]];
    for (k, n, t) in &entries {
        let mean = match (as_f64(t), *n) {
            (Some(t), n) if n > 0 => human_ns(t / n as f64),
            _ => String::new(),
        };
        rows.push(vec![
            k.to_string(),
            group(*n),
            percent(*n, total),
            ns(t),
            mean,
        ]);
    }
    rows.push(vec![
        "total".to_string(),
        group(total),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table(
        &rows,
        &[false, true, true, true, true],
        Some((1, true)),
        out,
    );
}

fn memory_section(v: &Value, out: &mut String) {
    let Some(m) = v.as_object() else {
        flat_section("Memory", v, out);
        return;
    };
    section("Memory", out);
    let mut rows = Vec::new();
    for k in ["slot_index", "slots", "generation"] {
        if let Some(x) = m.get(k) {
            rows.push(kv(k, scalar(x)));
        }
    }
    table(&rows, &[false, false], None, out);

    match m.get("lookups") {
        Some(Value::Object(l)) if !l.is_empty() => {
            out.push_str("  slot-index lookups\n");
            let cols = ["lookups", "hits", "misses", "mean_nodes", "max_nodes"];
            let mut rows = vec![vec!["source".to_string(), "index".to_string()]];
            rows[0].extend(cols.iter().map(|s| s.to_string()));
            for src in ordered_keys(l, &["exit", "dma"]) {
                let s = &l[src];
                let mut row = vec![src.to_string()];
                match s {
                    Value::Object(s) => {
                        row.push(s.get("index").map(scalar).unwrap_or_else(|| "-".into()));
                        row.extend(
                            cols.iter()
                                .map(|c| s.get(*c).map(scalar).unwrap_or_else(|| "-".into())),
                        );
                    }
                    _ => row.push(short(s, 40)),
                }
                rows.push(row);
            }
            indented(
                4,
                &rows,
                &[false, false, true, true, true, true, true],
                Some((1, false)),
                out,
            );
        }
        Some(Value::Object(_)) | None => {}
        Some(x) => {
            let _ = writeln!(out, "  lookups: {}", short(x, 100));
        }
    }
    if let Some(mc) = m.get("miss_cache") {
        out.push_str("  MMIO-miss cache\n");
        let mut rows = ordered_rows(
            mc,
            "miss_cache",
            &["enabled", "entries", "hits", "misses", "invalidations"],
        );
        if let (Some(h), Some(miss)) = (
            mc.get("hits").and_then(Value::as_u64),
            mc.get("misses").and_then(Value::as_u64),
        ) {
            rows.push(kv("hit rate", percent(h, h.saturating_add(miss))));
        }
        indented(4, &rows, &[false, false], None, out);
    }
    if let Some(mm) = m.get("mmio") {
        out.push_str("  MMIO routing\n");
        let rows = ordered_rows(
            mm,
            "mmio",
            &[
                "exits",
                "device",
                "unmapped_reads",
                "unmapped_writes",
                "readonly_writes",
            ],
        );
        indented(4, &rows, &[false, false], None, out);
    }
    let rest: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| {
            ![
                "slot_index",
                "slots",
                "generation",
                "lookups",
                "miss_cache",
                "mmio",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !rest.is_empty() {
        table(&flatten(&Value::Object(rest)), &[false, false], None, out);
    }
}

fn net_section(v: &Value, out: &mut String) {
    let Some(n) = v.as_object() else {
        flat_section("Network", v, out);
        return;
    };
    section("Network", out);
    let mut rows = Vec::new();
    for k in NET_KEYS {
        if let Some(x) = n.get(*k) {
            let s = if k.ends_with("_bytes") {
                bytes(x)
            } else {
                scalar(x)
            };
            rows.push(kv(k, s));
        }
    }
    let rest: Map<String, Value> = n
        .iter()
        .filter(|(k, _)| !NET_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rows.extend(flatten(&Value::Object(rest)));
    table(&rows, &[false, false], None, out);
}

fn kvm_section(v: &Value, out: &mut String) {
    let Some(k) = v.as_object() else {
        flat_section("KVM statistics", v, out);
        return;
    };
    section("KVM statistics (nonzero counters)", out);
    let mut keys: Vec<&String> = k.keys().collect();
    // `vm` before `vcpu`, then anything else.
    keys.sort_by_key(|n| match n.as_str() {
        "vm" => (0, n.as_str()),
        "vcpu" => (1, n.as_str()),
        other => (2, other),
    });
    for name in keys {
        let stats = collect_kvm(&k[name]);
        let shown: Vec<(&String, u64)> = {
            let mut s: Vec<_> = stats
                .iter()
                .filter(|(_, v)| **v != 0)
                .map(|(n, v)| (n, *v))
                .collect();
            s.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            s
        };
        let _ = writeln!(
            out,
            "  {name}: {} of {} counters nonzero",
            shown.len(),
            stats.len()
        );
        let rows: Vec<Vec<String>> = shown
            .iter()
            .map(|(n, v)| vec![n.to_string(), group(*v)])
            .collect();
        indented(4, &rows, &[false, true], None, out);
    }
}

/// Scalar counters of one KVM stats object (or an array of them, one per vCPU, summed).
fn collect_kvm(v: &Value) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let mut add = |o: &Map<String, Value>| {
        for (n, x) in o {
            if let Some(x) = x.as_u64() {
                let e = m.entry(n.clone()).or_insert(0u64);
                *e = e.saturating_add(x);
            }
        }
    };
    match v {
        Value::Object(o) => add(o),
        Value::Array(a) => a.iter().filter_map(Value::as_object).for_each(&mut add),
        _ => {}
    }
    m
}

/// The keys of `m`: those in `preferred` first, in that order, then the rest.
fn ordered_keys<'a>(m: &'a Map<String, Value>, preferred: &[&'a str]) -> Vec<&'a str> {
    let mut keys: Vec<&str> = preferred
        .iter()
        .copied()
        .filter(|k| m.contains_key(*k))
        .collect();
    keys.extend(
        m.keys()
            .map(String::as_str)
            .filter(|k| !preferred.contains(k)),
    );
    keys
}

/// `[key, value]` rows of an object, `preferred` keys first; other values as [`flatten`].
fn ordered_rows(v: &Value, label: &str, preferred: &[&str]) -> Vec<Vec<String>> {
    let Some(m) = v.as_object() else {
        return flatten_at(label, v);
    };
    let mut rows = Vec::new();
    for k in ordered_keys(m, preferred) {
        rows.extend(flatten_at(k, &m[k]));
    }
    rows
}

/// A section of `key  value` lines from any JSON value.
fn flat_section(title: &str, v: &Value, out: &mut String) {
    section(title, out);
    let rows = flatten(v);
    if rows.is_empty() {
        out.push_str("  (empty)\n");
    }
    table(&rows, &[false, false], None, out);
}

/// `[path, value]` rows: nested objects become `a.b`, arrays of objects `a[0].b`;
/// arrays of scalars are joined on one line.
fn flatten(v: &Value) -> Vec<Vec<String>> {
    flatten_at("", v)
}

/// [`flatten`] with every path under `prefix`.
fn flatten_at(prefix: &str, v: &Value) -> Vec<Vec<String>> {
    fn walk(prefix: &str, v: &Value, depth: usize, rows: &mut Vec<Vec<String>>) {
        let join = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match v {
            Value::Object(o) if depth < 8 => {
                for (k, x) in o {
                    walk(&join(k), x, depth + 1, rows);
                }
            }
            Value::Array(a) if depth < 8 && a.iter().any(|x| x.is_object() || x.is_array()) => {
                for (i, x) in a.iter().enumerate().take(64) {
                    walk(&format!("{prefix}[{i}]"), x, depth + 1, rows);
                }
                if a.len() > 64 {
                    rows.push(vec![
                        format!("{prefix}[..]"),
                        format!("{} more", a.len() - 64),
                    ]);
                }
            }
            _ => rows.push(vec![
                if prefix.is_empty() {
                    "value".into()
                } else {
                    prefix.to_string()
                },
                scalar(v),
            ]),
        }
    }
    let mut rows = Vec::new();
    walk(prefix, v, 0, &mut rows);
    rows
}

fn section(title: &str, out: &mut String) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push('\n');
}

fn kv(k: &str, v: String) -> Vec<String> {
    vec![k.to_string(), v]
}

fn table(
    rows: &[Vec<String>],
    right: &[bool],
    header_footer: Option<(usize, bool)>,
    out: &mut String,
) {
    indented(2, rows, right, header_footer, out)
}

/// Aligned columns; `right[i]` right-aligns column `i` (header cells included).
/// `header_footer = Some((header_rows, has_footer))` draws rules under the header and
/// above the last row.
fn indented(
    indent: usize,
    rows: &[Vec<String>],
    right: &[bool],
    header_footer: Option<(usize, bool)>,
    out: &mut String,
) {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; ncols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let total: usize = width.iter().sum::<usize>() + 2 * ncols.saturating_sub(1);
    let rule = |out: &mut String| {
        let _ = writeln!(out, "{:indent$}{}", "", "-".repeat(total));
    };
    let (header_rows, footer) = header_footer.unwrap_or((0, false));
    for (ri, r) in rows.iter().enumerate() {
        if footer && ri + 1 == rows.len() && ri > 0 {
            rule(out);
        }
        let mut line = " ".repeat(indent);
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width[i] - c.chars().count();
            if right.get(i).copied().unwrap_or(false) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if ri + 1 == header_rows && rows.len() > header_rows {
            rule(out);
        }
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// A scalar for a table cell: integers with thousands separators, floats with 2 decimals.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                group(u)
            } else if let Some(i) = n.as_i64() {
                format!("-{}", group(i.unsigned_abs()))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                format!("{f:.2}")
            }
        }
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            let mut s = a.iter().take(16).map(scalar).collect::<Vec<_>>().join(", ");
            if a.len() > 16 {
                let _ = write!(s, ", ... ({} in all)", a.len());
            }
            format!("[{s}]")
        }
        _ => short(v, 60),
    }
}

/// A scalar as-is (ids, not quantities).
fn raw(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => scalar(v),
    }
}

/// Compact JSON, cut to `max` characters.
fn short(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() > max {
        let mut t: String = s.chars().take(max).collect();
        t.push_str("...");
        t
    } else {
        s
    }
}

/// `1234567` -> `1,234,567`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        return String::new();
    }
    format!("{:.1}%", part as f64 * 100.0 / total as f64)
}

/// Nanoseconds from a JSON value, humanised.
fn ns(v: &Value) -> String {
    match as_f64(v) {
        Some(f) => human_ns(f),
        None => scalar(v),
    }
}

fn human_ns(ns: f64) -> String {
    let a = ns.abs();
    if a < 1e3 {
        format!("{ns:.0} ns")
    } else if a < 1e6 {
        format!("{:.1} us", ns / 1e3)
    } else if a < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// Bytes from a JSON value: exact count plus a binary-unit figure.
fn bytes(v: &Value) -> String {
    let Some(b) = v.as_u64() else {
        return scalar(v);
    };
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut f = b as f64 / 1024.0;
    let mut u = 0;
    while f >= 1024.0 && u + 1 < UNITS.len() {
        f /= 1024.0;
        u += 1;
    }
    format!("{} ({f:.1} {})", group(b), UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        let devices: Vec<Value> = (0..12)
            .map(|i| json!({"bus": if i % 2 == 0 { "pio" } else { "mmio" }, "device": format!("dev{i}"), "offset": i * 4, "count": 1000 - i * 10}))
            .collect();
        json!({
            "outcome": "Shutdown",
            "exit_code": 0,
            "setup_us": 12345,
            "rss_overhead_bytes": 5_242_880u64,
            "threads": {"vcpu": [4101, 4102], "io": 4100},
            "affinity": {"vcpu": [[2], [3]], "io": [0, 1]},
            "exits": {"io_in": 1200, "io_out": 3400, "mmio_read": 10, "mmio_write": 20,
                      "unclaimed_pio": 5, "hlt": 0, "interrupted": 7, "int3_injected": 0, "other": 1},
            "exit_latency": {
                "io_out": {"count": 3400, "mean_ns": 850, "p50_ns": 700, "p99_ns": 4500, "max_ns": 2_500_000},
                "mmio_read": {"count": 10, "mean_ns": 2000, "p50_ns": 1900, "p99_ns": 3000, "max_ns": 3100}
            },
            "exits_by_device": devices,
            "interrupts": {"gsi16": {"injected": 42, "resampled": 41}},
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
                    "vcpu": {"exits": 5000, "io_exits": 4600, "halt_exits": 0, "halt_poll_fail_hist": [1, 2, 3]}},
            "future_field": {"x": 1}
        })
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
        let s = summarize(&sample());
        println!("{s}");
        for (parts, what) in [
            (&["outcome", "Shutdown"][..], "outcome"),
            (&["setup", "12,345 us", "12.35 ms"], "setup"),
            (&["RSS overhead", "5,242,880", "5.0 MiB"], "rss"),
            (&["vCPU threads", "4101 4102"], "vcpu tids"),
            (&["I/O thread", "4100"], "io tid"),
            (&["vcpu[0]", "[2]"], "affinity"),
            (
                &[
                    "kind", "count", "share", "timed", "mean", "p50", "p99", "max",
                ],
                "exit header",
            ),
            (
                &[
                    "io_out", "3,400", "73.2%", "3,400", "850 ns", "700 ns", "4.5 us", "2.50 ms",
                ],
                "io_out",
            ),
            (&["io_in", "1,200"], "io_in"),
            (&["total", "4,643"], "total"),
            (&["Exits by device (top 10 of 12)"], "device title"),
            (&["pio", "dev0", "0x0", "1,000"], "top device"),
            (&["gsi16.injected", "42"], "interrupts"),
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
            (&["future_field.x", "1"], "unknown field"),
        ] {
            assert!(
                has_line(&s, parts),
                "{what}: no line with {parts:?} in\n{s}"
            );
        }
        // Only 10 devices, zero KVM counters and histograms hidden.
        assert!(!s.contains("dev10") && !s.contains("dev11"), "{s}");
        assert!(s.contains("dev9"), "{s}");
        assert!(
            !s.contains("pages_4k")
                && !s.contains("halt_exits")
                && !s.contains("halt_poll_fail_hist"),
            "{s}"
        );
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
    fn empty_and_garbage_never_panic() {
        assert_eq!(summarize(&json!({})), "(no statistics)\n");
        assert!(summarize(&json!(null)).contains("not a wbvmm stats object"));
        assert!(summarize(&json!([1, 2])).contains("not a wbvmm stats object"));
        let garbage = json!({
            "outcome": {"weird": true}, "exit_code": "zero", "setup_us": -5, "rss_overhead_bytes": "lots",
            "threads": "none", "affinity": 3, "exits": [1, 2], "exit_latency": {"io_in": 5, "hlt": {"count": "x"}},
            "exits_by_device": [1, "x", {"count": -1}, {"bus": 7, "offset": "far"}, null],
            "interrupts": [], "memory": {"lookups": [], "miss_cache": 5, "mmio": null, "slots": 1.5},
            "net": "down", "kvm": {"vm": 1, "vcpu": [{"exits": 3}, {"exits": 4}, 9], "x": null},
            "nested": {"a": [[{"b": 1}]]}
        });
        let s = summarize(&garbage);
        assert!(s.contains("exit code") && s.contains("zero"), "{s}");
        assert!(has_line(&s, &["vcpu: 1 of 1 counters nonzero"]), "{s}");
        assert!(
            has_line(&s, &["exits", "7"]),
            "summed per-vCPU kvm exits: {s}"
        );
        for v in [
            json!({"exits": null}),
            json!({"exits": {"io_in": "x", "other": 1.5}}),
            json!({"exit_latency": []}),
            json!({"exits_by_device": {}}),
            json!({"memory": 0, "net": {}, "kvm": []}),
            json!({"kvm": {"vcpu": {"exits": 18446744073709551615u64, "b": 18446744073709551615u64}}}),
            json!({"setup_us": 1e300, "rss_overhead_bytes": 18446744073709551615u64}),
        ] {
            summarize(&v);
        }
    }

    #[test]
    fn emulation_fallbacks_are_listed_by_count() {
        let v = json!({"emulated": {
            "popcnt": {"count": 4, "total_ns": 4000},
            "cmpxchg16b": {"count": 12, "total_ns": 36000},
        }});
        let s = summarize(&v);
        let a = s.find("cmpxchg16b").expect("cmpxchg16b row");
        let b = s.find("popcnt").expect("popcnt row");
        assert!(a < b, "most frequent first\n{s}");
        assert!(s.contains("3.0 us") && s.contains("75.0%"), "{s}");
        assert!(!s.contains("Other"), "{s}");
        // Nothing emulated: no section.
        assert!(!summarize(&json!({"emulated": {}})).contains("Emulation"));
    }

    #[test]
    fn number_formats() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(human_ns(999.0), "999 ns");
        assert_eq!(human_ns(1500.0), "1.5 us");
        assert_eq!(bytes(&json!(512)), "512 B");
        assert_eq!(scalar(&json!(-1234)), "-1,234");
        assert_eq!(scalar(&json!(0.5)), "0.50");
    }
}
