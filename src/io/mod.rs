//! File formats: NIfTI volumes, PNG canvases, PyTorch checkpoints, dataset folders. No tch here.
pub mod dataset;
pub mod nifti;
pub mod png;
pub mod pytorch;

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
