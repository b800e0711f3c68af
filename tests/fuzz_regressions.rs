//! Replays saved fuzz inputs through the fuzz target bodies
//! (`whipgate::fuzzing`, the same code `cargo fuzz` runs): every file in
//! `tests/fuzz_regressions/<target>/` (crashes `scripts/fuzz.sh` kept, and
//! hand-made nasty inputs) and the seed corpus in `fuzz/seeds/<target>/`.
//! None may panic.

use std::path::{Path, PathBuf};

use whipgate::fuzzing::{TARGETS, target};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

/// Runs every file of `root/<target>/` through its target; returns how many.
fn replay(root: &Path) -> usize {
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, body) in TARGETS {
        for file in files(&root.join(name)) {
            let data = std::fs::read(&file).expect("readable input");
            count += 1;
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "panicked on {failures:#?}");
    count
}

fn root(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn saved_regressions_do_not_panic() {
    let dir = root("tests/fuzz_regressions");
    for (name, _) in TARGETS {
        assert!(
            !files(&dir.join(name)).is_empty(),
            "no regression input for {name}"
        );
    }
    // Every directory is a target (a renamed target must not leave its
    // inputs silently unused).
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz_regressions") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert!(
                target(name).is_some(),
                "{} is no fuzz target",
                path.display()
            );
        }
    }
    assert!(replay(&dir) >= 2 * TARGETS.len());
}

#[test]
fn seed_corpus_does_not_panic() {
    assert!(replay(&root("fuzz/seeds")) >= TARGETS.len());
}
