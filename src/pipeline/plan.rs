//! A dataset's fingerprint — spacings, shapes, foreground intensities, class sizes — and what a
//! training configuration makes of it: the spacing it trains at, the V-Net's patch and the
//! inference stride ([`plan_grid`], which `pipeline::train` calls too, so that the plan printed
//! is the one trained), the volumes at that spacing, how much of the foreground one patch sees,
//! SAM's canvas and the intensity normalisation (`sfr plan`).
//!
//! With a budget, `patch_budget` voxels per patch (the compute of one V-Net step on a CPU grows
//! with them), the patch is planned too: shaped like the labelled foreground, the spacing
//! coarsened where even that patch would see less than `patch_context` of it. No preset plans
//! its patch (on the left atrium the shaped patch scored below the preset's; docs/results.md).
//! Where a patch still sees less than half of the foreground along an axis (a `spacing` given,
//! or `patch_context` 0), the plan says so and names the isotropic spacing at which it would
//! see half.
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
    /// The V-Net's patch (i, j, k), where it comes from, and what it covers, mm.
    pub patch_budget: usize,
    pub patch: [usize; 3],
    pub patch_from: &'static str,
    pub patch_mm: [f64; 3],
    /// The sliding window's stride at inference (i, j, k).
    pub stride: [usize; 3],
    /// How SAM's canvas holds the slices of the SAM stage's patch (with SFR on).
    pub sam_canvas: Option<SamCanvas>,
    /// Patch extent over the foreground's median extent, per axis.
    pub patch_over_foreground: [f64; 3],
    /// What training does to the intensities (`normalization`, `auto` resolved by the caller).
    pub normalization: String,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SamCanvas {
    /// Side of the square canvas, pixels.
    pub image_size: usize,
    /// Slices of the SAM stage's patch stitched on one canvas, and their grid.
    pub slices: usize,
    pub rows: usize,
    pub columns: usize,
    /// One slice on the canvas (rows × columns, pixels: magnified `sam.scale`×).
    pub slice: [usize; 2],
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

/// Where the training spacing comes from (`GridPlan::spacing_from`, recorded in the model).
pub const SPACING_FROM_CONFIG: &str = "the configuration's spacing";
pub const SPACING_FROM_MEDIAN: &str = "the median spacing of the cases";
pub const SPACING_FROM_CONTEXT: &str = "the median spacing, coarsened so that one patch spans patch_context of the foreground";

/// The grid training runs on: its spacing, the V-Net's patch and the inference stride, and
/// where the spacing and the patch come from. `pipeline::train` and `sfr plan` both take it
/// from [`plan_grid`], so that the plan printed is the one trained.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridPlan {
    pub spacing: [f64; 3],
    pub spacing_from: &'static str,
    /// `[x, y, z]` voxels.
    pub patch: [usize; 3],
    pub patch_from: &'static str,
    /// `[x, y, z]` voxels.
    pub stride: [usize; 3],
}

impl GridPlan {
    /// `cfg` with this plan's patch and stride: the configuration training runs with.
    pub fn applied_to(&self, cfg: &TrainConfig) -> TrainConfig {
        let mut c = cfg.clone();
        c.patch = self.patch;
        c.inference.stride = self.stride;
        c
    }
}

/// The spacing, patch and stride `cfg` gives a dataset whose median spacing is `median`, whose
/// labelled foreground's median bounding box is `foreground_mm` (None: no labelled foreground)
/// and whose median field of view is `extent_mm` (all x, y, z in mm).
///
/// - Patch: `cfg.patch`, or with `patch_budget` > 0 the patch of at most that many voxels
///   that spans the most of the foreground along its worst-covered axis ([`budget_patch`]):
///   shaped like the structure, not like the preset's default.
/// - Spacing: `cfg.spacing`; else the median spacing, coarsened (isotropically, to a multiple
///   of 0.05 mm, never finer than the median on any axis) where the patch there would span
///   less than `cfg.patch_context` of the foreground along some axis. With a budget the patch
///   is planned again at each candidate spacing, and the finest spacing whose patch spans the
///   share wins.
/// - Stride: `inference.stride`; a stride of half the configured patch (the presets') stays
///   half of a planned patch, any other is kept, clipped to the patch.
pub fn plan_grid(cfg: &TrainConfig, median: [f64; 3], foreground_mm: Option<[f64; 3]>, extent_mm: [f64; 3]) -> GridPlan {
    let aim = foreground_mm.unwrap_or(extent_mm);
    let slice_cap = cfg.sam.image_size / cfg.sam.scale.max(1);
    let patch_at = |s: [f64; 3]| if cfg.patch_budget == 0 { cfg.patch } else { budget_patch(cfg.patch_budget, s, aim, extent_mm, slice_cap) };
    let spans = |p: [usize; 3], s: [f64; 3], fg: [f64; 3]| (0..3).all(|a| p[a] as f64 * s[a] >= cfg.patch_context * fg[a]);
    let (spacing, spacing_from) = match (cfg.spacing, foreground_mm.filter(|_| cfg.patch_context > 0.0)) {
        (Some(s), _) => (s, SPACING_FROM_CONFIG),
        (None, None) => (median, SPACING_FROM_MEDIAN),
        (None, Some(fg)) if spans(patch_at(median), median, fg) => (median, SPACING_FROM_MEDIAN),
        (None, Some(fg)) if cfg.patch_budget == 0 => {
            let iso = context_spacing(cfg.patch, fg, cfg.patch_context, median);
            ([0, 1, 2].map(|a| median[a].max(iso)), SPACING_FROM_CONTEXT)
        }
        (None, Some(fg)) => {
            // Once every 16-voxel axis spans the share, any patch does: the search ends there.
            let last = (0..3).map(|a| cfg.patch_context * fg[a] / 16.0).fold(0.0, f64::max);
            let first = median.iter().cloned().fold(f64::INFINITY, f64::min);
            let mut k = (first * 20.0).floor() as usize + 1;
            loop {
                let iso = k as f64 / 20.0;
                let s = [0, 1, 2].map(|a| median[a].max(iso));
                if spans(patch_at(s), s, fg) || iso >= last {
                    break (s, SPACING_FROM_CONTEXT);
                }
                k += 1;
            }
        }
    };
    let patch = patch_at(spacing);
    let half = |p: [usize; 3]| p.map(|v| (v / 2).max(1));
    let stride = if cfg.patch_budget > 0 && cfg.inference.stride == half(cfg.patch) {
        half(patch)
    } else {
        [0, 1, 2].map(|a| cfg.inference.stride[a].min(patch[a]))
    };
    let patch_from = if cfg.patch_budget == 0 { "the configuration's patch" } else { "planned within patch_budget voxels to span the foreground" };
    GridPlan { spacing, spacing_from, patch, patch_from, stride }
}

/// The patch `[x, y, z]` (multiples of 16) of at most `budget` voxels that, at `spacing`,
/// spans the largest share of `aim_mm` along its worst-covered axis (shares above 1 count as
/// 1); ties go to the larger total share, then to more voxels. No axis is longer than the
/// median field of view `extent_mm` holds (at least 16), nor an in-plane axis longer than
/// `slice_cap` (SAM's canvas over `sam.scale`); every axis is at least 32 voxels where that
/// fits (a V-Net halves a patch four times: 16 leaves one voxel at its bottom), else 16.
pub fn budget_patch(budget: usize, spacing: [f64; 3], aim_mm: [f64; 3], extent_mm: [f64; 3], slice_cap: usize) -> [usize; 3] {
    let round16 = |v: usize| (v / 16 * 16).clamp(16, crate::limits::MAX_PATCH_AXIS);
    let cap = [0, 1, 2].map(|a| {
        let fov = round16((extent_mm[a] / spacing[a] + 1e-6) as usize);
        if a < 2 { fov.min(round16(slice_cap)) } else { fov }
    });
    let share = |p: usize, a: usize| if aim_mm[a] > 0.0 { (p as f64 * spacing[a] / aim_mm[a]).min(1.0) } else { 1.0 };
    for floor in [32, 16] {
        let mut best: Option<((f64, f64, usize), [usize; 3])> = None;
        let axis = |a: usize| (floor.min(cap[a])..=cap[a]).step_by(16);
        for x in axis(0) {
            for y in axis(1) {
                for z in axis(2) {
                    let voxels = x * y * z;
                    if voxels > budget {
                        continue;
                    }
                    let shares = [share(x, 0), share(y, 1), share(z, 2)];
                    let key = (shares.iter().cloned().fold(1.0, f64::min), shares.iter().sum::<f64>(), voxels);
                    let better = match &best {
                        None => true,
                        Some((b, _)) => {
                            let eq = |u: f64, v: f64| (u - v).abs() < 1e-9;
                            if !eq(key.0, b.0) {
                                key.0 > b.0
                            } else if !eq(key.1, b.1) {
                                key.1 > b.1
                            } else {
                                key.2 > b.2
                            }
                        }
                    };
                    if better {
                        best = Some((key, [x, y, z]));
                    }
                }
            }
        }
        if let Some((_, p)) = best {
            return p;
        }
    }
    [16, 16, 16]
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
    let grid = plan_grid(cfg, fp.spacing_median, fg_mm, fp.extent_mm_median);
    let spacing = grid.spacing;
    let planned = grid.applied_to(cfg);
    let shape_at_spacing = [0, 1, 2].map(|a| ((fp.extent_mm_median[a] / spacing[a]).round() as usize).max(1));
    let patch_mm = [0, 1, 2].map(|a| grid.patch[a] as f64 * spacing[a]);
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
            grid.patch,
            100.0 * cfg.patch_context,
            cfg.patch_context
        ));
    }
    if cfg.patch_budget > 0 {
        notes.push(format!(
            "patch {:?} voxels: the one of at most {} (patch_budget) that spans the most of the foreground ({fg:?} mm) along its worst-covered axis at {spacing:?} mm; \
             --set '{{\"patch\": [x, y, z]}}' fixes a patch of your choice",
            grid.patch, cfg.patch_budget
        ));
    }
    let worst = patch_over_foreground.iter().cloned().fold(f64::INFINITY, f64::min);
    if worst < 0.5 {
        let s = context_spacing(grid.patch, fg, 0.5, [0.0; 3]);
        notes.push(format!(
            "one {:?} patch at {spacing:?} mm spans {:.0}% of the foreground's median extent ({fg:?} mm) along its shortest-covered axis: the network sees little context. \
             A coarser spacing widens it: at --set '{{\"spacing\": [{s}, {s}, {s}]}}' a patch spans at least half of it along every axis (fine detail is lost in proportion)",
            grid.patch,
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
    let sam_canvas = match planned.sam_canvas_patch_zyx().and_then(|shape| crate::stitch::StitchLayout::for_shape(&shape, cfg.sam.image_size)) {
        Ok(l) => Some(SamCanvas { image_size: l.canvas, slices: l.d, rows: l.n_row, columns: l.n_col, slice: [l.h, l.w] }),
        Err(e) => {
            notes.push(format!("SAM's canvas cannot hold the patch {:?}: {e}", grid.patch));
            None
        }
    };
    Plan {
        preset: cfg.preset.clone(),
        spacing,
        patch_context: cfg.patch_context,
        spacing_from: grid.spacing_from,
        shape_at_spacing,
        patch_budget: cfg.patch_budget,
        patch: grid.patch,
        patch_from: grid.patch_from,
        patch_mm,
        stride: grid.stride,
        sam_canvas,
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

    #[test]
    fn a_budget_plans_a_patch_shaped_like_the_foreground() {
        let cfg = TrainConfig { patch_budget: 32 * 48 * 32, ..TrainConfig::cpu_small() };
        // Hippocampus's fingerprint (median volume 35×50×36 at 1 mm, foreground 23×41×26 mm):
        // the preset's own 32×48×32, at the median spacing, with the preset's stride.
        let g = plan_grid(&cfg, [1.0; 3], Some([23.0, 41.0, 26.0]), [35.0, 50.0, 36.0]);
        assert_eq!(g, GridPlan { spacing: [1.0; 3], spacing_from: SPACING_FROM_MEDIAN, patch: [32, 48, 32], patch_from: g.patch_from, stride: [16, 24, 16] });
        // The left atrium's (0.625 mm, field of view 120×89×55 mm, foreground 107×58×35 mm): a
        // patch long along x, and the finest 0.05 mm step at which it spans half of the
        // foreground along every axis; one step finer, the best patch there does not.
        let (fg, fov) = ([106.875, 58.125, 35.0], [120.0, 89.375, 55.0]);
        let g = plan_grid(&cfg, [0.625; 3], Some(fg), fov);
        assert_eq!((g.spacing, g.spacing_from, g.patch, g.stride), ([1.15; 3], SPACING_FROM_CONTEXT, [48, 32, 32], [24, 16, 16]));
        let spans = |p: [usize; 3], s: f64| (0..3).all(|a| p[a] as f64 * s >= 0.5 * fg[a]);
        assert!(spans(g.patch, 1.15));
        assert!(!spans(budget_patch(cfg.patch_budget, [1.1; 3], fg, fov, 256), 1.1));
        // Every planned patch: multiples of 16, within the budget and the field of view.
        for (s, fg, fov) in [(0.5, [10.0, 200.0, 30.0], [40.0, 300.0, 60.0]), (2.0, [300.0, 250.0, 400.0], [400.0, 400.0, 500.0]), (1.0, [5.0, 5.0, 5.0], [20.0, 20.0, 20.0])] {
            for budget in [4096, 49152, 1 << 20] {
                let p = budget_patch(budget, [s; 3], fg, fov, 256);
                assert!(p.iter().all(|&v| v % 16 == 0 && v >= 16) && p.iter().product::<usize>() <= budget, "{p:?}");
                assert!((0..3).all(|a| p[a] == 16 || p[a] as f64 * s <= fov[a]), "{p:?} exceeds the field of view {fov:?} at {s} mm");
            }
        }
        // A thin foreground (10 mm along x) still gets 32 voxels along x where the budget allows
        // (a V-Net halves 16 voxels to one); SAM's canvas caps the in-plane axes.
        assert_eq!(budget_patch(49152, [0.5; 3], [10.0, 200.0, 30.0], [40.0, 300.0, 60.0], 256)[0], 32);
        let p = budget_patch(1 << 20, [1.0; 3], [300.0; 3], [400.0; 3], 64);
        assert!(p[0] <= 64 && p[1] <= 64 && p[2] > 64, "{p:?}");
        // A fixed patch (no budget) is used as it is; a stride other than half the patch is kept,
        // clipped to a planned patch.
        let fixed = TrainConfig { patch_budget: 0, ..cfg.clone() };
        assert_eq!(plan_grid(&fixed, [1.0; 3], Some([23.0, 41.0, 26.0]), [35.0, 50.0, 36.0]).patch, [32, 48, 32]);
        let mut odd = cfg.clone();
        odd.inference.stride = [40, 8, 8];
        assert_eq!(plan_grid(&odd, [1.0; 3], Some([23.0, 41.0, 26.0]), [35.0, 50.0, 36.0]).stride, [32, 8, 8]);
    }
}
