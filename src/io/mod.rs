//! File formats: NIfTI volumes, PNG canvases (and the titles drawn into them), PyTorch checkpoints,
//! dataset folders. No tch here.
pub mod dataset;
pub mod nifti;
pub mod png;
pub mod pytorch;
pub mod text;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Temporary sibling path for atomic writes (write there, then rename over `path`): same
/// folder, so the rename is atomic; hidden; unique per process and call, so concurrent writers
/// never share one; ending in `suffix` (writers that look at the extension get the one they
/// need; no other dots).
pub fn temp_sibling(path: &Path, suffix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(".sfr-tmp-{}-{}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), suffix);
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => PathBuf::from(name),
    }
}

/// True when `a` and `b` are the same existing file: same device and inode, so symbolic links,
/// hard links and different spellings (`./x`, `d/../x`) are all seen through.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

/// Checks that a new file can be created in `dir` (which must exist), by creating and removing
/// a hidden one: this also catches read-only mounts and access rules that mode bits do not
/// show, and it runs before any work, so a run of hours cannot fail at its last write.
pub fn check_dir_writable(dir: &Path) -> Result<()> {
    let shown = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    match std::fs::metadata(shown) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::io(shown, std::io::Error::new(e.kind(), "the output folder does not exist")));
        }
        Err(e) => return Err(Error::io(shown, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::io(shown, std::io::Error::other("the output folder is not a folder")));
        }
        Ok(_) => {}
    }
    let probe = temp_sibling(&shown.join("x"), ".probe");
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::io(shown, std::io::Error::new(e.kind(), format!("cannot write in the output folder: {e}")))),
    }
}

/// Checks, before any work, that `output` may be written: it is none of `inputs` (writing it
/// would destroy an input: `sfr segment --input X --output X`), not a folder, and its folder
/// exists and is writable. Errors name the path.
pub fn check_output(output: &Path, inputs: &[&Path]) -> Result<()> {
    if let Some(i) = inputs.iter().find(|i| same_file(output, i)) {
        let what = if output == *i { String::new() } else { format!(" ({})", i.display()) };
        return Err(Error::invalid(format!(
            "{}: the output is an input{what}; writing it would destroy the input: choose another output file",
            output.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::invalid(format!("{}: the output is a folder; give a file name", output.display())));
    }
    check_dir_writable(output.parent().unwrap_or(Path::new("")))
}

/// The nearest existing folder of `dir` (itself or an ancestor) must be writable, so that
/// `dir` can be created and written later (work folders are created when first needed).
pub fn check_dir_creatable(dir: &Path) -> Result<()> {
    let mut d = dir;
    loop {
        if d.as_os_str().is_empty() || d.exists() {
            return check_dir_writable(d);
        }
        match d.parent() {
            Some(p) => d = p,
            None => return check_dir_writable(Path::new("")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_are_inputs_or_unwritable_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.nii.gz");
        std::fs::write(&a, b"x").unwrap();
        let b = dir.path().join("b.nii.gz");
        assert!(check_output(&b, &[&a]).is_ok());
        assert!(!b.exists(), "the probe leaves nothing");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = check_output(&a, &[&a]).unwrap_err().to_string();
        assert!(e.contains("a.nii.gz") && e.contains("output is an input"), "{e}");
        // other spellings, hard and symbolic links of the same file
        let dotted = dir.path().join(".").join("a.nii.gz");
        assert!(check_output(&dotted, &[&a]).is_err());
        let hard = dir.path().join("hard.nii.gz");
        std::fs::hard_link(&a, &hard).unwrap();
        assert!(check_output(&hard, &[&a]).is_err());
        #[cfg(unix)]
        {
            let soft = dir.path().join("soft.nii.gz");
            std::os::unix::fs::symlink(&a, &soft).unwrap();
            assert!(check_output(&soft, &[&a]).is_err());
        }
        let e = check_output(&dir.path().join("missing/x.nii.gz"), &[]).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("does not exist"), "{e}");
        let e = check_output(&a.join("x.nii.gz"), &[]).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        assert!(check_output(dir.path(), &[]).unwrap_err().to_string().contains("folder"));
        // /proc refuses new files even to root
        assert!(check_output(Path::new("/proc/sfr-test.nii.gz"), &[]).is_err());
        assert!(check_dir_creatable(&dir.path().join("w/x/y")).is_ok());
        assert!(check_dir_creatable(Path::new("/proc/sfr-test/work")).is_err());
    }
}
