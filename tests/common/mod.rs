//! Shared helpers of the integration tests: where the real data and the reference Python are.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::Command;

/// `../shared/data` seen from the crate root, when present. Tests that need it print why they
/// skip and return; `SFR_REQUIRE_DATA=1` (set by scripts/test.sh when the folder exists) turns
/// that into a failure so CI never counts a skip as a pass by accident.
pub fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if p.is_dir() {
        Some(p)
    } else if std::env::var("SFR_REQUIRE_DATA").as_deref() == Ok("1") {
        panic!("SFR_REQUIRE_DATA=1 but {} is absent", p.display());
    } else {
        eprintln!("SKIPPED: ../shared/data is absent (real-data test not run)");
        None
    }
}

/// The Python of the cached venv (torch, segment-anything, nibabel, scipy), used to make
/// reference outputs. `SFR_PYTHON` wins; else `$SFR_VENV/bin/python`; else python3 if it
/// imports torch. `SFR_REQUIRE_PYTHON=1` (set by scripts/test.sh) makes absence a failure.
pub fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("SFR_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("SFR_VENV").map(|v| PathBuf::from(v).join("bin/python")))
        .chain(std::iter::once(PathBuf::from("python3")))
        .collect();
    for c in candidates {
        let ok = Command::new(&c).args(["-c", "import torch, numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
        if ok {
            return Some(c);
        }
    }
    if std::env::var("SFR_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("SFR_REQUIRE_PYTHON=1 but no Python with torch was found (run scripts/setup.sh)");
    }
    eprintln!("SKIPPED: no Python with torch (set SFR_PYTHON or run scripts/setup.sh)");
    None
}

/// Run a reference script from tests/reference with arguments; panics with its stderr on failure.
pub fn run_python(py: &PathBuf, script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(script);
    let out = Command::new(py).arg(&path).args(args).output().expect("start python");
    if !out.status.success() {
        panic!("{} failed:\n{}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8(out.stdout).unwrap()
}
