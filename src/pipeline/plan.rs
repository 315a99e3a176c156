//! A dataset's fingerprint — spacings, shapes, foreground intensities, class sizes — and what a
//! training configuration makes of it: the spacing it trains at, the volumes and the patch at
//! that spacing, and how much of the foreground one patch sees (`sfr plan`).
//!
//! The plan chooses nothing the configuration does not already decide (the training spacing is
//! `spacing`, else the median); where a patch sees less than half of the foreground's extent
//! along an axis, it says so and names the isotropic spacing at which it would see half.
use crate::error::Result;
use crate::limits::Classes;
use crate::pipeline::config::TrainConfig;
use crate::pipeline::data::CaseSource;
use serde::Serialize;

/// Foreground intensities of the labelled cases (every voxel with a class > 0).
#[derive(Clone, Debug, Serialize)]
pub struct Intensity {
    pub p0_5: f32,
    pub p99_5: f32,
    pub mean: f64,
    pub std: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassPrint {
    pub id: u16,
    pub name: String,
    /// Mean over labelled cases of the class's share of the case's voxels.
    pub voxel_fraction: f64,
    /// Median over the labelled cases that have the class of its bounding box, mm (x, y, z).
    pub extent_mm: [f64; 3],
    /// Labelled cases in which the class appears.
    pub cases: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Fingerprint {
    pub cases: usize,
    pub labelled: usize,
    pub spacing_median: [f64; 3],
    pub spacing_min: [f64; 3],
    pub spacing_max: [f64; 3],
    /// Median voxels (i, j, k) and median field of view, mm.
    pub shape_median: [usize; 3],
    pub extent_mm_median: [f64; 3],
    /// Largest over smallest median spacing.
    pub anisotropy: f64,
    pub foreground_intensity: Option<Intensity>,
    /// Median bounding box of all classes together, mm (x, y, z).
    pub foreground_extent_mm: [f64; 3],
    pub classes: Vec<ClassPrint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub preset: String,
    /// The spacing training resamples every volume to, and where it comes from.
    pub spacing: [f64; 3],
    pub spacing_from: &'static str,
    /// Median voxels (i, j, k) of a volume at that spacing.
    pub shape_at_spacing: [usize; 3],
    /// The V-Net's patch (i, j, k) and what it covers, mm.
    pub patch: [usize; 3],
    pub patch_mm: [f64; 3],
    /// Patch extent over the foreground's median extent, per axis.
    pub patch_over_foreground: [f64; 3],
    pub normalization: &'static str,
    pub notes: Vec<String>,
}

/// The upper median (the middle value; of two, the larger). None when `v` is empty.
pub fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

fn per_axis<T: Copy + PartialOrd>(rows: &[[T; 3]], f: fn(Vec<T>) -> Option<T>, default: T) -> [T; 3] {
    [0, 1, 2].map(|a| f(rows.iter().map(|r| r[a]).collect()).unwrap_or(default))
}

/// Reads every case (labels of `labeled` only) and measures the dataset.
pub fn fingerprint(labeled: &[CaseSource], unlabeled: &[CaseSource], classes: &Classes) -> Result<Fingerprint> {
    let mut spacings = vec![];
    let mut shapes = vec![];
    let mut fg_values: Vec<f32> = vec![];
    let mut fg_extents = vec![];
    let ids: Vec<u16> = classes.keys().copied().filter(|&c| c != 0).collect();
    let mut per_class: Vec<(f64, Vec<[f64; 3]>)> = vec![(0.0, vec![]); ids.len()];
    for (i, case) in labeled.iter().chain(unlabeled).enumerate() {
        let (img, lab, _, lname) = case.read()?;
        let g = img.geometry;
        spacings.push(g.spacing);
        shapes.push(img.dims());
        let Some(lab) = lab.filter(|_| i < labeled.len()) else { continue };
        if lab.data.shape() != img.data.shape() {
            return Err(crate::Error::invalid(format!("{lname}: label dims {:?} differ from the image's {:?}", lab.dims(), img.dims())));
        }
        // Bounding boxes in voxels (i, j, k) per class and of all classes together.
        let mut lo = vec![[usize::MAX; 3]; ids.len() + 1];
        let mut hi = vec![[0usize; 3]; ids.len() + 1];
        let mut count = vec![0usize; ids.len()];
        for ((k, j, x), &v) in lab.data.indexed_iter() {
            if v == 0 {
                continue;
            }
            fg_values.push(img.data[[k, j, x]]);
            let c = ids.iter().position(|&c| c == v as u16);
            for slot in c.into_iter().chain([ids.len()]) {
                for (a, p) in [x, j, k].into_iter().enumerate() {
                    lo[slot][a] = lo[slot][a].min(p);
                    hi[slot][a] = hi[slot][a].max(p);
                }
            }
            if let Some(c) = c {
                count[c] += 1;
            }
        }
        let mm = |s: usize| [0, 1, 2].map(|a| (hi[s][a] + 1 - lo[s][a]) as f64 * g.spacing[a]);
        if lo[ids.len()][0] != usize::MAX {
            fg_extents.push(mm(ids.len()));
        }
        for c in 0..ids.len() {
            per_class[c].0 += count[c] as f64 / lab.data.len() as f64;
            if count[c] > 0 {
                per_class[c].1.push(mm(c));
            }
        }
    }
    let foreground_intensity = (!fg_values.is_empty()).then(|| {
        let n = fg_values.len() as f64;
        let mean = fg_values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (fg_values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let (p0_5, p99_5) = crate::volume::quantile_pair(&mut fg_values, (0.005, 0.995)).unwrap_or((0.0, 0.0));
        Intensity { p0_5, p99_5, mean, std }
    });
    let spacing_median = per_axis(&spacings, median, 1.0);
    let shape_median = per_axis(&shapes, median, 0);
    let extents: Vec<[f64; 3]> = spacings.iter().zip(&shapes).map(|(s, d)| [0, 1, 2].map(|a| s[a] * d[a] as f64)).collect();
    let n_labelled = labeled.len().max(1) as f64;
    Ok(Fingerprint {
        cases: spacings.len(),
        labelled: labeled.len(),
        spacing_median,
        spacing_min: [0, 1, 2].map(|a| spacings.iter().map(|s| s[a]).fold(f64::INFINITY, f64::min)),
        spacing_max: [0, 1, 2].map(|a| spacings.iter().map(|s| s[a]).fold(0.0, f64::max)),
        shape_median,
        extent_mm_median: per_axis(&extents, median, 0.0),
        anisotropy: spacing_median.iter().cloned().fold(0.0, f64::max) / spacing_median.iter().cloned().fold(f64::INFINITY, f64::min),
        foreground_intensity,
        foreground_extent_mm: per_axis(&fg_extents, median, 0.0),
        classes: ids
            .iter()
            .zip(per_class)
            .map(|(&id, (fraction, ext))| ClassPrint {
                id,
                name: classes.get(&id).cloned().unwrap_or_default(),
                voxel_fraction: fraction / n_labelled,
                cases: ext.len(),
                extent_mm: per_axis(&ext, median, 0.0),
            })
            .collect(),
    })
}

/// What `cfg` does with the dataset of `fp`.
pub fn plan(fp: &Fingerprint, cfg: &TrainConfig) -> Plan {
    let (spacing, spacing_from) = match cfg.spacing {
        Some(s) => (s, "the configuration's spacing"),
        None => (fp.spacing_median, "the median spacing of the cases"),
    };
    let shape_at_spacing = [0, 1, 2].map(|a| ((fp.extent_mm_median[a] / spacing[a]).round() as usize).max(1));
    let patch_mm = [0, 1, 2].map(|a| cfg.patch[a] as f64 * spacing[a]);
    let fg = fp.foreground_extent_mm;
    let patch_over_foreground = [0, 1, 2].map(|a| if fg[a] > 0.0 { patch_mm[a] / fg[a] } else { f64::INFINITY });
    let mut notes = vec![];
    if fp.spacing_max.iter().zip(&fp.spacing_min).any(|(hi, lo)| hi / lo > 1.01) {
        notes.push(format!(
            "spacings differ between cases ({:?} to {:?} mm): training resamples every case to {spacing:?} mm",
            fp.spacing_min, fp.spacing_max
        ));
    }
    if fp.anisotropy > 3.0 {
        notes.push(format!("anisotropic scans (median spacing {:?} mm, ratio {:.1})", fp.spacing_median, fp.anisotropy));
    }
    let worst = patch_over_foreground.iter().cloned().fold(f64::INFINITY, f64::min);
    if worst < 0.5 {
        // The isotropic spacing at which a patch spans half the foreground along every axis.
        let half = (0..3).map(|a| 0.5 * fg[a] / cfg.patch[a] as f64).fold(0.0, f64::max);
        let s = (half * 20.0).ceil() / 20.0;
        notes.push(format!(
            "one {:?} patch at {spacing:?} mm spans {:.0}% of the foreground's median extent ({fg:?} mm) along its shortest-covered axis: the network sees little context. \
             A coarser spacing widens it: at --set '{{\"spacing\": [{s}, {s}, {s}]}}' a patch spans at least half of it along every axis (fine detail is lost in proportion)",
            cfg.patch,
            100.0 * worst
        ));
    }
    Plan {
        preset: cfg.preset.clone(),
        spacing,
        spacing_from,
        shape_at_spacing,
        patch: cfg.patch,
        patch_mm,
        patch_over_foreground,
        normalization: "per-volume z-score (every modality)",
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Geometry, Volume};
    use ndarray::{s, Array3};

    #[test]
    fn fingerprint_measures_spacing_extent_classes_and_intensity() {
        // Two cases: a 10×8×6-voxel class-1 box (x, y, z) at 1 × 1 × 2 mm, image 100 inside.
        let case = |id: &str, sz: f64| {
            let mut lab = Array3::<u8>::zeros((12, 20, 30));
            lab.slice_mut(s![2..8, 4..12, 5..15]).fill(1);
            let img = lab.mapv(|v| if v == 1 { 100.0f32 } else { 0.0 });
            let g = Geometry { spacing: [1.0, 1.0, sz], ..Geometry::default() };
            CaseSource::memory(id, Volume::new(img, g), Some(Volume::new(lab, g)))
        };
        let classes = Classes::new("l", [(0, "background".into()), (1, "organ".into())].into()).unwrap();
        let fp = fingerprint(&[case("a", 2.0), case("b", 2.0)], &[case("u", 3.0)], &classes).unwrap();
        assert_eq!((fp.cases, fp.labelled), (3, 2));
        assert_eq!(fp.spacing_median, [1.0, 1.0, 2.0]);
        assert_eq!(fp.spacing_max, [1.0, 1.0, 3.0]);
        assert_eq!(fp.shape_median, [30, 20, 12]);
        assert_eq!(fp.foreground_extent_mm, [10.0, 8.0, 12.0]);
        assert_eq!(fp.classes[0].extent_mm, [10.0, 8.0, 12.0]);
        assert_eq!(fp.classes[0].cases, 2);
        assert!((fp.classes[0].voxel_fraction - 480.0 / 7200.0).abs() < 1e-12);
        let i = fp.foreground_intensity.as_ref().unwrap();
        assert_eq!((i.p0_5, i.p99_5, i.mean, i.std), (100.0, 100.0, 100.0, 0.0));

        // A 16³ patch at 2 mm spans 32 mm ≥ every extent: nothing to say but the spacings.
        let mut cfg = TrainConfig::test_tiny();
        cfg.patch = [16, 16, 16];
        cfg.spacing = Some([2.0, 2.0, 2.0]);
        let p = plan(&fp, &cfg);
        assert_eq!(p.patch_mm, [32.0, 32.0, 32.0]);
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        // At 0.25 mm a patch spans 4 mm of a 12 mm extent: said, with a spacing that spans half.
        cfg.spacing = Some([0.25, 0.25, 0.25]);
        let p = plan(&fp, &cfg);
        assert!(p.notes.iter().any(|n| n.contains("\"spacing\": [0.4, 0.4, 0.4]")), "{:?}", p.notes);
    }
}
