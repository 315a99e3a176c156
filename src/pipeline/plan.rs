//! A dataset's fingerprint — spacings, shapes, foreground intensities, class sizes — and what a
//! training configuration makes of it: the spacing it trains at, the volumes and the patch at
//! that spacing, and how much of the foreground one patch sees (`sfr plan`).
//!
//! The training spacing is the configuration's `spacing`, else the median spacing, coarsened
//! where one patch would span less than `patch_context` of the foreground's median extent
//! (`training_spacing`, which `pipeline::train` calls too, so that the plan printed is the one
//! trained). Where a patch still sees less than half of the foreground along an axis (a
//! `spacing` given, or `patch_context` 0), the plan says so and names the isotropic spacing at
//! which it would see half.
use crate::error::Result;
use crate::limits::Classes;
use crate::pipeline::config::{NormalizationChoice, TrainConfig};
use crate::volume::{CtWindow, Normalization};
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
    /// Labelled cases with any foreground (those `foreground_extent_mm` is the median of).
    pub foreground_cases: usize,
    pub classes: Vec<ClassPrint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub preset: String,
    /// The spacing training resamples every volume to, and where it comes from.
    pub spacing: [f64; 3],
    pub patch_context: f64,
    pub spacing_from: &'static str,
    /// Median voxels (i, j, k) of a volume at that spacing.
    pub shape_at_spacing: [usize; 3],
    /// The V-Net's patch (i, j, k) and what it covers, mm.
    pub patch: [usize; 3],
    pub patch_mm: [f64; 3],
    /// Patch extent over the foreground's median extent, per axis.
    pub patch_over_foreground: [f64; 3],
    /// What training does to the intensities (`normalization`, `auto` resolved by the caller).
    pub normalization: String,
    pub notes: Vec<String>,
}

/// The upper median (the middle value; of two, the larger). None when `v` is empty.
pub fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// The bounding box of every voxel with a class > 0, in mm (x, y, z); None when there is none.
pub fn foreground_extent_mm(label: &ndarray::Array3<u8>, spacing: [f64; 3]) -> Option<[f64; 3]> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for ((k, j, x), &v) in label.indexed_iter() {
        if v != 0 {
            for (a, p) in [x, j, k].into_iter().enumerate() {
                lo[a] = lo[a].min(p);
                hi[a] = hi[a].max(p);
            }
        }
    }
    (lo[0] != usize::MAX).then(|| [0, 1, 2].map(|a| (hi[a] + 1 - lo[a]) as f64 * spacing[a]))
}

/// The spacing training resamples to, and where it comes from: `cfg.spacing`; else the median
/// spacing, coarsened (isotropically, to a multiple of 0.05 mm, never finer than the median on
/// any axis) where a `cfg.patch` there would span less than `cfg.patch_context` of the
/// foreground's median extent `foreground_mm` along some axis.
pub fn training_spacing(cfg: &TrainConfig, median: [f64; 3], foreground_mm: Option<[f64; 3]>) -> ([f64; 3], &'static str) {
    if let Some(s) = cfg.spacing {
        return (s, "the configuration's spacing");
    }
    let Some(fg) = foreground_mm.filter(|_| cfg.patch_context > 0.0) else { return (median, "the median spacing of the cases") };
    if (0..3).all(|a| cfg.patch[a] as f64 * median[a] >= cfg.patch_context * fg[a]) {
        return (median, "the median spacing of the cases");
    }
    let iso = context_spacing(cfg.patch, fg, cfg.patch_context, median);
    ([0, 1, 2].map(|a| median[a].max(iso)), "the median spacing, coarsened so that one patch spans patch_context of the foreground")
}

/// The finest isotropic spacing s, a multiple of 0.05 mm, at which `patch` spans `share` of the
/// extent `fg` (mm) along every axis when each axis is at the coarser of s and `floor` (an axis
/// that spans it at its floor needs nothing; a floor of zeros asks for s alone).
fn context_spacing(patch: [usize; 3], fg: [f64; 3], share: f64, floor: [f64; 3]) -> f64 {
    let need = (0..3).filter(|&a| (patch[a] as f64) * floor[a] < share * fg[a]).map(|a| share * fg[a] / patch[a] as f64).fold(0.0, f64::max);
    // The tolerance keeps an exact multiple (1.7 from 1.7000000000000002) where it is.
    (need * 20.0 - 1e-9).ceil() / 20.0
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
        fg_extents.extend(foreground_extent_mm(&lab.data, g.spacing));
        // Bounding boxes in voxels (i, j, k) per class.
        let mut lo = vec![[usize::MAX; 3]; ids.len()];
        let mut hi = vec![[0usize; 3]; ids.len()];
        let mut count = vec![0usize; ids.len()];
        for ((k, j, x), &v) in lab.data.indexed_iter() {
            if v == 0 {
                continue;
            }
            fg_values.push(img.data[[k, j, x]]);
            if let Some(c) = ids.iter().position(|&c| c == v as u16) {
                for (a, p) in [x, j, k].into_iter().enumerate() {
                    lo[c][a] = lo[c][a].min(p);
                    hi[c][a] = hi[c][a].max(p);
                }
                count[c] += 1;
            }
        }
        let mm = |s: usize| [0, 1, 2].map(|a| (hi[s][a] + 1 - lo[s][a]) as f64 * g.spacing[a]);
        for c in 0..ids.len() {
            per_class[c].0 += count[c] as f64 / lab.data.len() as f64;
            if count[c] > 0 {
                per_class[c].1.push(mm(c));
            }
        }
    }
    // The numbers CT normalisation's window takes from the same voxels.
    let foreground_intensity = CtWindow::of_values(&mut fg_values).map(|w| Intensity { p0_5: w.clip[0], p99_5: w.clip[1], mean: w.mean, std: w.std });
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
        foreground_cases: fg_extents.len(),
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
    let fg_mm = (fp.foreground_cases > 0).then_some(fp.foreground_extent_mm);
    let (spacing, spacing_from) = training_spacing(cfg, fp.spacing_median, fg_mm);
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
    if spacing != fp.spacing_median && cfg.spacing.is_none() {
        notes.push(format!(
            "training coarsens the median spacing {:?} mm to {spacing:?} mm, so that one {:?} patch spans at least {:.0}% of the foreground's median extent ({fg:?} mm) along every axis \
             (patch_context {}; --set '{{\"patch_context\": 0}}' trains at the median, '{{\"spacing\": [x, y, z]}}' at a spacing of your choice)",
            fp.spacing_median,
            cfg.patch,
            100.0 * cfg.patch_context,
            cfg.patch_context
        ));
    }
    let worst = patch_over_foreground.iter().cloned().fold(f64::INFINITY, f64::min);
    if worst < 0.5 {
        let s = context_spacing(cfg.patch, fg, 0.5, [0.0; 3]);
        notes.push(format!(
            "one {:?} patch at {spacing:?} mm spans {:.0}% of the foreground's median extent ({fg:?} mm) along its shortest-covered axis: the network sees little context. \
             A coarser spacing widens it: at --set '{{\"spacing\": [{s}, {s}, {s}]}}' a patch spans at least half of it along every axis (fine detail is lost in proportion)",
            cfg.patch,
            100.0 * worst
        ));
    }
    let normalization = match cfg.normalization.resolve(None) {
        NormalizationChoice::Ct => {
            let ct = match &fp.foreground_intensity {
                Some(i) => Normalization::ct(CtWindow { clip: [i.p0_5, i.p99_5], mean: i.mean, std: i.std }, "the labelled cases"),
                None => Err(crate::Error::invalid("the labelled cases: CT normalisation needs labelled foreground voxels, and the labels have none")),
            };
            match ct {
                Ok(n) => n.describe(),
                Err(e) => {
                    notes.push(format!("{e}: training will refuse CT normalisation"));
                    "CT (no usable window)".into()
                }
            }
        }
        _ => Normalization::ZscorePerVolume.describe(),
    };
    Plan {
        preset: cfg.preset.clone(),
        spacing,
        patch_context: cfg.patch_context,
        spacing_from,
        shape_at_spacing,
        patch: cfg.patch,
        patch_mm,
        patch_over_foreground,
        normalization,
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

        // No spacing given: the median [1, 1, 2], where a 4³ patch spans 4 × 4 × 8 mm, less than
        // half of 10 × 8 × 12 mm along x: coarsened to the finest multiple of 0.05 mm that spans
        // half (5 mm / 4 = 1.25), never finer than the median's 2 mm along z.
        cfg.spacing = None;
        cfg.patch = [4, 4, 4];
        cfg.patch_context = 0.5;
        let p = plan(&fp, &cfg);
        assert_eq!(p.spacing, [1.25, 1.25, 2.0]);
        assert!(p.patch_over_foreground.iter().all(|&r| r >= 0.5), "{:?}", p.patch_over_foreground);
        assert!(p.notes.iter().any(|n| n.contains("coarsens the median spacing")), "{:?}", p.notes);
        // patch_context 0: the median, and the note naming the spacing that would span half.
        cfg.patch_context = 0.0;
        let p = plan(&fp, &cfg);
        assert_eq!(p.spacing, [1.0, 1.0, 2.0]);
        assert!(p.notes.iter().any(|n| n.contains("\"spacing\": [1.5, 1.5, 1.5]")), "{:?}", p.notes);
        // A patch that already spans the share: the median, untouched.
        cfg.patch_context = 0.5;
        cfg.patch = [16, 16, 16];
        assert_eq!(plan(&fp, &cfg).spacing, [1.0, 1.0, 2.0]);
        // An exact multiple stays itself: 0.5 × 54.4 mm / 16 = 1.7 (1.7000000000000002 in floats).
        assert_eq!(context_spacing([16, 16, 16], [54.4, 1.0, 1.0], 0.5, [0.0; 3]), 1.7);
    }
}
