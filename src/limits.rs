//! Bounds on every size and count that a user, a config file, a C caller or a model file can
//! set. They are checked in one place, before any work (`TrainConfig::validate`, which the CLI,
//! the C ABI and the Slicer module all go through, and `ModelMeta::validate`, which every model
//! load goes through), so that no value can make the library allocate terabytes, start
//! hundreds of threads or overflow a stack in the middle of a run, killing its host process
//! (a C program, 3D Slicer).
//!
//! The bounds are far above any setting of the paper (patch 112×112×80, canvas 1024, batch
//! 2+2, 16 filters, LoRA rank 4) and far below what would overflow or exhaust a machine. They
//! are documented in README ("Limits") where users set these values.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Display;

/// Largest volume read, written or segmented: 2³¹ voxels (e.g. 1290³, or 1024×1024×2048).
pub const MAX_VOXELS: usize = 1 << 31;
/// Class probabilities held while segmenting one volume (classes × voxels): 2³² floats, 16 GiB.
pub const MAX_PROBABILITY_VALUES: usize = 1 << 32;
/// `threads` (intra-op threads of libtorch): 0 (auto: the free cores) or 1..=256.
pub const MAX_THREADS: usize = 256;
/// Largest patch axis (V-Net patch, inference window, SAM stitching unit).
pub const MAX_PATCH_AXIS: usize = 512;
/// Largest patch volume: 256³ voxels.
pub const MAX_PATCH_VOXELS: usize = 1 << 24;
/// Canvas size S: `sam.image_size` and `sfr stitch --canvas`.
pub const MIN_SAM_IMAGE_SIZE: usize = 64;
pub const MAX_CANVAS: usize = 2048;
/// Every batch size (`sam.batch`, `vnet.labeled_batch`, `vnet.unlabeled_batch`,
/// `inference.batch`).
pub const MAX_BATCH: usize = 64;
/// Voxels (or canvas pixels) of one batch: 64 Mi, e.g. 4 patches of 256³ or 64 canvases of 1024².
pub const MAX_BATCH_VOXELS: usize = 1 << 26;
/// V-Net base filters (16 in the paper; the bottleneck has 16× as many).
pub const MAX_N_FILTERS: i64 = 128;
/// LoRA rank (4 in the paper).
pub const MAX_LORA_RANK: usize = 256;
/// `sam.scale`: in-plane magnification of stitched slices.
pub const MAX_SAM_SCALE: usize = 8;
/// `sam.lora_last_blocks`: SAM ViT-H, the deepest official encoder, has 32 blocks.
pub const MAX_SAM_ATTENTION_BLOCKS: usize = 32;
/// Iterations of either stage (6000 in the paper) and iterations per epoch.
pub const MAX_ITERATIONS: usize = 10_000_000;
/// SFR+ rounds.
pub const MAX_SFR_PLUS_ROUNDS: usize = 100;
/// Classes, background included: labels are stored as bytes.
pub const MAX_CLASSES: usize = 256;

/// `lo <= value <= hi`, else an error naming the setting and the allowed range.
pub fn check_range<T: PartialOrd + Display>(what: &str, value: T, lo: T, hi: T) -> Result<()> {
    if value < lo || value > hi {
        return Err(Error::invalid(format!("{what} = {value} is out of range: allowed {lo}..={hi}")));
    }
    Ok(())
}

/// A finite number > 0 (learning rates, spacings).
pub fn check_positive(what: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::invalid(format!("{what} = {value} must be a finite number > 0")));
    }
    Ok(())
}

/// A finite number ≥ 0 (weight decays, loss weights, noise).
pub fn check_non_negative(what: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(Error::invalid(format!("{what} = {value} must be a finite number ≥ 0")));
    }
    Ok(())
}

/// A patch `[x, y, z]`: every axis a multiple of 16 (the V-Net halves it four times) in
/// 16..=MAX_PATCH_AXIS, at most MAX_PATCH_VOXELS in all.
pub fn check_patch(what: &str, patch: [usize; 3]) -> Result<()> {
    if patch.iter().any(|&p| p == 0 || p % 16 != 0) {
        return Err(Error::invalid(format!("{what} {patch:?} must be a positive multiple of 16 on every axis (the V-Net halves it four times)")));
    }
    if patch.iter().any(|&p| p > MAX_PATCH_AXIS) {
        return Err(Error::invalid(format!("{what} {patch:?} is out of range: at most {MAX_PATCH_AXIS} per axis")));
    }
    let voxels = patch.iter().product::<usize>();
    if voxels > MAX_PATCH_VOXELS {
        return Err(Error::invalid(format!("{what} {patch:?} has {voxels} voxels, more than the limit of {MAX_PATCH_VOXELS} (256³)")));
    }
    Ok(())
}

/// `batch` items of `item_voxels` voxels each: 1..=MAX_BATCH items, at most MAX_BATCH_VOXELS.
pub fn check_batch(what: &str, batch: usize, item_voxels: usize) -> Result<()> {
    check_range(what, batch, 1, MAX_BATCH)?;
    let total = batch.saturating_mul(item_voxels);
    if total > MAX_BATCH_VOXELS {
        return Err(Error::invalid(format!(
            "{what} = {batch}: {batch} × {item_voxels} voxels per batch exceeds the limit of {MAX_BATCH_VOXELS}; use a smaller batch or patch"
        )));
    }
    Ok(())
}

/// Class indices must be 0..N-1 without gaps (N = 2..=MAX_CLASSES): the networks have one
/// output per index, so a gap would train an undeclared class. Returns N.
pub fn check_classes<'a>(what: &str, classes: impl IntoIterator<Item = &'a u16>) -> Result<usize> {
    let mut keys: Vec<u16> = classes.into_iter().copied().collect();
    keys.sort_unstable();
    keys.dedup();
    if !keys.contains(&0) {
        return Err(Error::invalid(format!("{what}: the classes must include 0 (background)")));
    }
    let n = keys.len();
    if n < 2 {
        return Err(Error::invalid(format!("{what}: at least one foreground class must be declared besides the background (0)")));
    }
    if n > MAX_CLASSES {
        return Err(Error::invalid(format!("{what}: {n} classes, more than the limit of {MAX_CLASSES} (labels are stored as bytes)")));
    }
    if let Some(missing) = (0..n as u16).find(|i| keys.binary_search(i).is_err()) {
        let listed: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        return Err(Error::invalid(format!(
            "{what}: class indices must be 0..{} without gaps, but {missing} is missing (declared: {})",
            n - 1,
            listed.join(", ")
        )));
    }
    Ok(n)
}

/// The classes of a dataset or a model: index -> name, background (0) included, indices 0..N-1
/// without gaps, 2 ≤ N ≤ [`MAX_CLASSES`]. Only [`Classes::new`] makes one (a model file's
/// metadata is read through it too), so every entry point — `dataset.json`, the C ABI's
/// `classes_json`, the pipeline's inputs and model files — applies the one rule of
/// [`check_classes`], and code holding a `Classes` need not check again. Read-only: it derefs
/// to its map; N is its `len()`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<u16, String>", into = "BTreeMap<u16, String>")]
pub struct Classes(BTreeMap<u16, String>);

impl Classes {
    /// Checks `classes` ([`check_classes`]); `what` names the source in the error
    /// ("labels", "classes_json", ...).
    pub fn new(what: &str, classes: BTreeMap<u16, String>) -> Result<Classes> {
        check_classes(what, classes.keys())?;
        Ok(Classes(classes))
    }
}

impl std::ops::Deref for Classes {
    type Target = BTreeMap<u16, String>;
    fn deref(&self) -> &BTreeMap<u16, String> {
        &self.0
    }
}

/// For serde: model metadata (`"classes"`).
impl TryFrom<BTreeMap<u16, String>> for Classes {
    type Error = Error;
    fn try_from(classes: BTreeMap<u16, String>) -> Result<Classes> {
        Classes::new("classes", classes)
    }
}

impl From<Classes> for BTreeMap<u16, String> {
    fn from(c: Classes) -> Self {
        c.0
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (what can be allocated without swapping); None
/// where the system does not say (then no check is made).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(check_range("t", 5usize, 1, 4).unwrap_err().to_string().contains("t = 5"));
        assert!(check_range("t", 4usize, 1, 4).is_ok());
        assert!(check_positive("lr", 0.0).is_err());
        assert!(check_positive("lr", -1e-3).is_err());
        assert!(check_positive("lr", f64::NAN).is_err());
        assert!(check_positive("lr", 1e-3).is_ok());
        assert!(check_non_negative("wd", 0.0).is_ok());
        assert!(check_non_negative("wd", f64::INFINITY).is_err());
        assert!(check_patch("patch", [112, 112, 80]).is_ok());
        assert!(check_patch("patch", [4096, 4096, 4096]).is_err());
        assert!(check_patch("patch", [512, 512, 512]).is_err()); // each axis fine, too many voxels
        assert!(check_patch("patch", [0, 16, 16]).is_err());
        assert!(check_batch("b", 2, 112 * 112 * 80).is_ok());
        assert!(check_batch("b", 100_000, 16).is_err());
        assert!(check_batch("b", 0, 16).is_err());
        assert!(check_batch("b", 64, 256 * 256 * 256).is_err());
    }

    #[test]
    fn classes() {
        assert_eq!(check_classes("c", &[0u16, 1, 2]).unwrap(), 3);
        let named = |keys: &[u16]| keys.iter().map(|&k| (k, format!("c{k}"))).collect::<BTreeMap<u16, String>>();
        assert_eq!(Classes::new("c", named(&[0, 1, 2])).unwrap().len(), 3);
        let e = Classes::new("labels", named(&[0, 2])).unwrap_err().to_string();
        assert!(e.contains("labels") && e.contains("1 is missing"), "{e}");
        // model files: the same rule when parsed, the same JSON when written
        let c: Classes = serde_json::from_str(r#"{"0": "bg", "1": "a"}"#).unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"0":"bg","1":"a"}"#);
        let e = serde_json::from_str::<Classes>(r#"{"0": "bg", "2": "x"}"#).unwrap_err().to_string();
        assert!(e.contains("classes") && e.contains("1 is missing"), "{e}");
        let e = check_classes("c", &[0u16, 2]).unwrap_err().to_string();
        assert!(e.contains("1 is missing"), "{e}");
        assert!(check_classes("c", &[0u16]).is_err());
        assert!(check_classes("c", &[1u16, 2]).is_err());
        let many: Vec<u16> = (0..300).collect();
        assert!(check_classes("c", &many).is_err());
    }
}
