//! ARCHITECTURE.md stays true: every path it names in backticks exists.

use std::path::Path;

/// Backticked words that look like repository paths (`src/...`, `devices/...`, ...).
fn named_paths(doc: &str) -> Vec<String> {
    doc.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.contains('/')
                && !w.contains(' ')
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_path_in_architecture_md_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let paths = named_paths(&doc);
    // The page names the whole exit path and every thread's files: far more than this.
    assert!(
        paths.len() >= 30,
        "only {} paths found: {paths:?}",
        paths.len()
    );
    let missing: Vec<&String> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names files that do not exist (moved? update the page): {missing:?}"
    );
}

#[test]
fn the_path_filter_sees_paths_and_only_paths() {
    let doc = "a `src/vmm.rs` b `wbvmm stats` c `Token` d `devices/fuzz/` e `x/y z`";
    assert_eq!(named_paths(doc), ["src/vmm.rs", "devices/fuzz/"]);
}
