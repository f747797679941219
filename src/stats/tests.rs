//! Writing and reading `--stats` files.

use super::*;
use crate::error_chain;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wbvmm-stats-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
fn write_file_replaces_and_leaves_no_temp() {
    let d = scratch("replace");
    let p = d.join("s.json");
    write_file(&p, b"{\"a\": 1}\n").unwrap();
    write_file(&p, b"{\"a\": 2}\n").unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\": 2}\n");
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["s.json"]);
    std::fs::remove_dir_all(d).unwrap();
}

/// A reader racing the writer sees one whole version or the other.
#[test]
fn readers_never_see_a_partial_file() {
    let d = scratch("race");
    let p = d.join("s.json");
    let big = |n: u8| vec![b'a' + n; 1 << 20];
    write_file(&p, &big(0)).unwrap();
    let reader = {
        let p = p.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                let b = std::fs::read(&p).unwrap();
                assert_eq!(b.len(), 1 << 20);
                assert!(b.iter().all(|&c| c == b[0]));
            }
        })
    };
    for i in 0..50 {
        write_file(&p, &big(i % 2)).unwrap();
    }
    reader.join().unwrap();
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn check_destination_reports_the_path_and_errno() {
    let d = scratch("check");
    let ok = d.join("s.json");
    check_destination(&ok).unwrap();
    assert!(!ok.exists() && !temp_path(&ok).exists());

    let missing = d.join("nosuch/s.json");
    let e = check_destination(&missing).unwrap_err();
    let chain = error_chain(&e);
    assert!(
        chain.starts_with(&format!(
            "cannot create the --stats file {}",
            missing.display()
        )),
        "{chain}"
    );
    assert_eq!(chain.matches("(os error 2)").count(), 1, "{chain}");

    let e = check_destination(&d).unwrap_err();
    assert!(
        error_chain(&e).contains("Is a directory (os error 21)"),
        "{e}"
    );

    // A device is written in place and needs no temporary file.
    check_destination(Path::new("/dev/null")).unwrap();
    write_file(Path::new("/dev/null"), b"{}").unwrap();
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn write_failure_names_the_path() {
    let d = scratch("fail");
    let p = d.join("gone/s.json");
    let e = write_file(&p, b"{}").unwrap_err();
    let chain = error_chain(&e);
    assert!(
        chain.starts_with(&format!("cannot write the --stats file {}", p.display())),
        "{chain}"
    );
    assert!(
        chain.contains("caused by: No such file or directory (os error 2)"),
        "{chain}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn read_file_errors() {
    let d = scratch("read");
    let p = d.join("s.json");
    let e = read_file(&p).unwrap_err();
    assert!(error_chain(&e).contains("(os error 2)"), "{e}");
    std::fs::write(&p, "not json").unwrap();
    let e = read_file(&p).unwrap_err();
    assert!(e.to_string().contains("is not a --stats JSON file"), "{e}");
    assert!(
        error_chain(&e).contains("caused by: expected"),
        "{}",
        error_chain(&e)
    );
    std::fs::remove_dir_all(d).unwrap();
}
