//! Aligned text tables and number formats for `wbvmm stats`.

use std::fmt::Write;

/// A blank line (unless first), then the title.
pub fn section(title: &str, out: &mut String) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push('\n');
}

pub fn kv(k: &str, v: impl Into<String>) -> Vec<String> {
    vec![k.to_string(), v.into()]
}

/// Cells from string slices (table headers).
pub fn cells(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

/// Header and footer rules, for [`indented`].
#[derive(Clone, Copy, Default)]
pub struct Rules {
    /// Rows above the rule under the header (0: no header).
    pub header_rows: usize,
    /// A rule above the last row.
    pub footer: bool,
}

pub const HEADER: Rules = Rules {
    header_rows: 1,
    footer: false,
};
pub const HEADER_AND_FOOTER: Rules = Rules {
    header_rows: 1,
    footer: true,
};

/// [`indented`] by two spaces.
pub fn table(rows: &[Vec<String>], right: &[bool], rules: Rules, out: &mut String) {
    indented(2, rows, right, rules, out)
}

/// Aligned columns; `right[i]` right-aligns column `i` (header cells included).
pub fn indented(
    indent: usize,
    rows: &[Vec<String>],
    right: &[bool],
    rules: Rules,
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
    for (ri, r) in rows.iter().enumerate() {
        if rules.footer && ri + 1 == rows.len() && ri > 0 {
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
        if ri + 1 == rules.header_rows && rows.len() > rules.header_rows {
            rule(out);
        }
    }
}

/// `1234567` -> `1,234,567`.
pub fn group(n: u64) -> String {
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

/// `part` of `total` as `12.5%`; empty when the total is 0.
pub fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        return String::new();
    }
    format!("{:.1}%", part as f64 * 100.0 / total as f64)
}

pub fn human_ns(ns: f64) -> String {
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

pub fn ns(n: u64) -> String {
    human_ns(n as f64)
}

/// Exact count plus a binary-unit figure.
pub fn bytes(b: u64) -> String {
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

    #[test]
    fn number_formats() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(human_ns(999.0), "999 ns");
        assert_eq!(human_ns(1500.0), "1.5 us");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(5 << 20), "5,242,880 (5.0 MiB)");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(1, 0), "");
    }

    #[test]
    fn columns_align_with_rules() {
        let mut out = String::new();
        let rows = vec![
            cells(&["kind", "count"]),
            cells(&["io_in", "5"]),
            cells(&["total", "1,000"]),
        ];
        table(&rows, &[false, true], HEADER_AND_FOOTER, &mut out);
        assert_eq!(
            out,
            "  kind   count\n  ------------\n  io_in      5\n  ------------\n  total  1,000\n"
        );
    }
}
