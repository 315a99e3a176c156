//! Segmentation metrics: Dice, Jaccard, surface distances (ASD, ASSD, HD, HD95) in millimetres.
//!
//! The definitions are those of `medpy.metric.binary` (0.5.2), which UA-MT, ACMT, SFR and most
//! of the semi-supervised segmentation literature use to report their tables, so numbers from
//! this module can be put beside published ones:
//!
//! - **Dice** `2|P∩R| / (|P|+|R|)`, **Jaccard** `|P∩R| / |P∪R|` (medpy `dc`, `jc`).
//! - **Surface** of a mask: its voxels that have at least one of their 6 face neighbours outside
//!   the mask, the array's outside counting as background (medpy: `m ^ binary_erosion(m,
//!   generate_binary_structure(3, 1))`, scipy's default border value 0).
//! - **Surface distances** from P to R: for every surface voxel of P, the Euclidean distance in
//!   mm (voxel spacing applied per axis, so anisotropic voxels are handled) to the nearest surface
//!   voxel of R. Computed with an exact separable squared Euclidean distance transform
//!   (Felzenszwalb & Huttenlocher 2012), never a chamfer approximation; this equals scipy's
//!   `distance_transform_edt(~border_R, sampling)` read at P's surface voxels.
//! - **`asd`** = mean of the distances P→R only (medpy `asd(pred, ref)`, one-directional; this
//!   is the "ASD" of the SSL papers, which call `asd(pred, gt)`).
//! - **`assd`** = mean of the P→R and R→P distances pooled together (medpy 0.5.2 `assd`).
//!   Note: medpy ≤ 0.4 defined `assd` as the mean of the two directed means instead; the two
//!   agree when both surfaces have the same number of voxels.
//! - **`hd`** = largest distance of either direction (medpy `hd`).
//! - **`hd95`** = 95th percentile of the pooled P→R and R→P distances with numpy's default
//!   linear interpolation (medpy `hd95`: `np.percentile(np.hstack((d1, d2)), 95)`). It is not
//!   the max of the two directed percentiles.
//!
//! Empty masks (medpy raises for the distances; we define them):
//! - P and R both empty: Dice 1, Jaccard 1 (as medpy), and every distance `Some(0.0)`: the
//!   prediction agrees perfectly that the structure is absent.
//! - exactly one empty: Dice 0, Jaccard 0, every distance `None` (a distance to nothing is
//!   undefined; serialised as JSON `null`). Averaging code must skip `None`, not treat it as 0.
//!
//! Array layout: masks are `[nz, ny, nx]` (`data[[k, j, i]]`, as [`Volume`] stores them) while
//! spacing is given as `[sx, sy, sz]` (ITK order, as [`crate::Geometry`] stores it), so axis 0 of
//! the array uses `spacing[2]`.
use crate::error::{Error, Result};
use crate::volume::{Volume, Voxel};
use ndarray::{s, Array3, ArrayView3, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Metrics of one binary prediction against one binary reference. Distances are in mm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    pub dice: f64,
    pub jaccard: f64,
    /// Mean surface distance prediction → reference (medpy `asd(pred, ref)`).
    pub asd: Option<f64>,
    /// Mean of the pooled distances of both directions (medpy 0.5.2 `assd`).
    pub assd: Option<f64>,
    /// Hausdorff distance (max over both directions).
    pub hd: Option<f64>,
    /// 95th percentile of the pooled distances of both directions (medpy `hd95`).
    pub hd95: Option<f64>,
    pub pred_voxels: u64,
    pub ref_voxels: u64,
}

/// [`BinaryMetrics`] of one label value of a label map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: u16,
    pub dice: f64,
    pub jaccard: f64,
    pub asd: Option<f64>,
    pub assd: Option<f64>,
    pub hd: Option<f64>,
    pub hd95: Option<f64>,
    pub pred_voxels: u64,
    pub ref_voxels: u64,
}

impl ClassMetrics {
    pub fn new(class: u16, m: BinaryMetrics) -> Self {
        ClassMetrics {
            class,
            dice: m.dice,
            jaccard: m.jaccard,
            asd: m.asd,
            assd: m.assd,
            hd: m.hd,
            hd95: m.hd95,
            pred_voxels: m.pred_voxels,
            ref_voxels: m.ref_voxels,
        }
    }
}

/// Surface distances of both directions, in mm, in no particular order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SurfaceDistances {
    /// One entry per surface voxel of the prediction: distance to the reference's surface.
    pub pred_to_ref: Vec<f64>,
    /// One entry per surface voxel of the reference: distance to the prediction's surface.
    pub ref_to_pred: Vec<f64>,
}

fn check_spacing(spacing_xyz: [f64; 3]) -> Result<()> {
    if spacing_xyz.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(Error::invalid(format!("metrics: spacing must be positive and finite, got {spacing_xyz:?}")));
    }
    Ok(())
}

fn check_shapes<T>(pred: &ArrayView3<T>, reference: &ArrayView3<T>) -> Result<()> {
    if pred.shape() != reference.shape() {
        return Err(Error::invalid(format!(
            "metrics: prediction shape {:?} differs from reference shape {:?} ([nz, ny, nx])",
            pred.shape(),
            reference.shape()
        )));
    }
    Ok(())
}

/// Voxel counts and the bounding box of P ∪ R, in one parallel pass.
#[derive(Clone, Copy)]
struct Overlap {
    pred: u64,
    reference: u64,
    both: u64,
    lo: [usize; 3],
    hi: [usize; 3], // inclusive; meaningful only when pred + reference > 0
}

impl Overlap {
    fn empty() -> Self {
        Overlap { pred: 0, reference: 0, both: 0, lo: [usize::MAX; 3], hi: [0; 3] }
    }
    fn merge(mut self, o: Overlap) -> Self {
        self.pred += o.pred;
        self.reference += o.reference;
        self.both += o.both;
        for a in 0..3 {
            self.lo[a] = self.lo[a].min(o.lo[a]);
            self.hi[a] = self.hi[a].max(o.hi[a]);
        }
        self
    }
}

fn overlap(pred: &ArrayView3<bool>, reference: &ArrayView3<bool>) -> Overlap {
    pred.axis_iter(Axis(0))
        .into_par_iter()
        .zip(reference.axis_iter(Axis(0)).into_par_iter())
        .enumerate()
        .map(|(k, (p, r))| {
            let mut o = Overlap::empty();
            for (((j, i), &a), &b) in p.indexed_iter().zip(r.iter()) {
                if a | b {
                    o.pred += a as u64;
                    o.reference += b as u64;
                    o.both += (a & b) as u64;
                    for (ax, idx) in [k, j, i].into_iter().enumerate() {
                        o.lo[ax] = o.lo[ax].min(idx);
                        o.hi[ax] = o.hi[ax].max(idx);
                    }
                }
            }
            o
        })
        .reduce(Overlap::empty, Overlap::merge)
}

/// Surface voxels of `mask` (see the module doc), as a new standard-layout array.
pub fn surface(mask: &ArrayView3<bool>) -> Array3<bool> {
    let (nz, ny, nx) = mask.dim();
    let mut out = Array3::from_elem((nz, ny, nx), false);
    out.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(k, mut sl)| {
        for ((j, i), o) in sl.indexed_iter_mut() {
            if !mask[[k, j, i]] {
                continue;
            }
            // Neighbours outside the array count as background (scipy's border_value = 0).
            *o = k == 0
                || k + 1 == nz
                || j == 0
                || j + 1 == ny
                || i == 0
                || i + 1 == nx
                || !mask[[k - 1, j, i]]
                || !mask[[k + 1, j, i]]
                || !mask[[k, j - 1, i]]
                || !mask[[k, j + 1, i]]
                || !mask[[k, j, i - 1]]
                || !mask[[k, j, i + 1]];
        }
    });
    out
}

/// Scratch space of the 1D lower-envelope transform for lines of up to `n` samples.
struct Envelope {
    v: Vec<usize>,
    z: Vec<f64>,
}

impl Envelope {
    fn new(n: usize) -> Self {
        Envelope { v: vec![0; n], z: vec![0.0; n + 1] }
    }

    /// 1D squared distance transform of sampled function `f` (f[q] at position q·s mm;
    /// infinity = no feature): `d[x] = min_q ((x−q)·s)² + f[q]`, exact (Felzenszwalb &
    /// Huttenlocher's lower envelope of parabolas).
    fn transform(&mut self, f: &[f64], s: f64, d: &mut [f64]) {
        let n = f.len();
        let Some(first) = f.iter().position(|x| x.is_finite()) else {
            d.fill(f64::INFINITY);
            return;
        };
        let (v, z) = (&mut self.v, &mut self.z);
        let mut k = 0usize;
        v[0] = first;
        z[0] = f64::NEG_INFINITY;
        z[1] = f64::INFINITY;
        for q in first + 1..n {
            let fq = f[q];
            if !fq.is_finite() {
                continue; // no parabola: infinitely high
            }
            let hq = fq + (q as f64 * s) * (q as f64 * s);
            let mut sep;
            loop {
                let p = v[k];
                let hp = f[p] + (p as f64 * s) * (p as f64 * s);
                sep = (hq - hp) / (2.0 * s * (q - p) as f64);
                // z[0] = -inf, so this stops at k = 0.
                if sep <= z[k] {
                    k -= 1;
                } else {
                    break;
                }
            }
            k += 1;
            v[k] = q;
            z[k] = sep;
            z[k + 1] = f64::INFINITY;
        }
        k = 0;
        for (x, dx) in d.iter_mut().enumerate() {
            let xs = x as f64 * s;
            while z[k + 1] < xs {
                k += 1;
            }
            let off = (x as f64 - v[k] as f64) * s;
            *dx = off * off + f[v[k]];
        }
    }
}

/// Columns handled together in the strided pass, so that each row read fills whole cache lines.
const BLOCK: usize = 16;

/// Squared EDT of `features` along axes 0 and 1 only, into `buf` (same shape; every value is
/// overwritten, so a buffer can be reused). The x pass is left to the caller, which may need it
/// on a few rows only. `sp` = spacing per array axis `[s0, s1, s2]`.
fn edt_zy(features: &ArrayView3<bool>, sp: [f64; 3], buf: &mut Array3<f64>) {
    let (nz, ny, nx) = features.dim();
    debug_assert_eq!(buf.dim(), features.dim());
    // Axis 0 on a binary input: distance in voxels to the nearest feature along each column, by
    // a forward and a backward sweep done row by row (contiguous), parallel over j.
    buf.axis_iter_mut(Axis(1)).into_par_iter().zip(features.axis_iter(Axis(1)).into_par_iter()).for_each(
        |(mut b, f)| {
            let mut run = vec![f64::INFINITY; nx];
            for k in 0..nz {
                for ((r, bv), &fv) in run.iter_mut().zip(b.row_mut(k).iter_mut()).zip(f.row(k).iter()) {
                    *r = if fv { 0.0 } else { *r + 1.0 };
                    *bv = *r;
                }
            }
            run.fill(f64::INFINITY);
            for k in (0..nz).rev() {
                for ((r, bv), &fv) in run.iter_mut().zip(b.row_mut(k).iter_mut()).zip(f.row(k).iter()) {
                    *r = if fv { 0.0 } else { *r + 1.0 };
                    let d = bv.min(*r);
                    *bv = if d.is_finite() { (d * sp[0]) * (d * sp[0]) } else { f64::INFINITY };
                }
            }
        },
    );
    // Axis 1: per slice, columns gathered in blocks of BLOCK.
    buf.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut sl| {
        let mut env = Envelope::new(ny);
        let mut gathered = vec![0.0; BLOCK * ny];
        let mut out = vec![0.0; ny];
        let mut i0 = 0;
        while i0 < nx {
            let w = BLOCK.min(nx - i0);
            for (j, row) in sl.outer_iter().enumerate() {
                for b in 0..w {
                    gathered[b * ny + j] = row[i0 + b];
                }
            }
            for b in 0..w {
                let line = &mut gathered[b * ny..(b + 1) * ny];
                env.transform(line, sp[1], &mut out);
                line.copy_from_slice(&out);
            }
            for (j, mut row) in sl.outer_iter_mut().enumerate() {
                for b in 0..w {
                    row[i0 + b] = gathered[b * ny + j];
                }
            }
            i0 += w;
        }
    });
}

/// Exact Euclidean distance transform in mm: for every voxel, the distance to the nearest
/// `true` voxel of `features` (0 on features; infinity everywhere when there is none).
/// Equals scipy's `distance_transform_edt(~features, sampling=(sz, sy, sx))`.
pub fn distance_transform(features: &ArrayView3<bool>, spacing_xyz: [f64; 3]) -> Result<Array3<f64>> {
    check_spacing(spacing_xyz)?;
    let sp = [spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]];
    let mut buf = Array3::<f64>::zeros(features.raw_dim());
    edt_zy(features, sp, &mut buf);
    let nx = features.dim().2;
    buf.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut sl| {
        let mut env = Envelope::new(nx);
        let mut line = vec![0.0; nx];
        let mut out = vec![0.0; nx];
        for mut row in sl.outer_iter_mut() {
            for (l, &v) in line.iter_mut().zip(row.iter()) {
                *l = v;
            }
            env.transform(&line, sp[2], &mut out);
            for (r, &o) in row.iter_mut().zip(out.iter()) {
                *r = o.sqrt();
            }
        }
    });
    Ok(buf)
}

/// Distances (mm) from every `true` voxel of `queries` to the nearest `true` voxel of
/// `features`; all arrays of the same shape, standard layout; `buf` is scratch space.
fn distances_at(features: &ArrayView3<bool>, queries: &Array3<bool>, sp: [f64; 3], buf: &mut Array3<f64>) -> Vec<f64> {
    edt_zy(features, sp, buf);
    let nx = features.dim().2;
    if nx == 0 {
        return Vec::new();
    }
    // The x pass is needed only on rows that hold query voxels (a small share for surfaces).
    let bs = buf.as_slice().expect("edt buffer is created in standard layout");
    let qs = queries.as_slice().expect("surface masks are created in standard layout");
    bs.par_chunks(nx)
        .zip(qs.par_chunks(nx))
        .fold(
            || (Envelope::new(nx), vec![0.0; nx], Vec::new()),
            |(mut env, mut out, mut acc), (row, qrow)| {
                if qrow.iter().any(|&q| q) {
                    env.transform(row, sp[2], &mut out);
                    acc.extend(qrow.iter().zip(&out).filter(|(q, _)| **q).map(|(_, d)| d.sqrt()));
                }
                (env, out, acc)
            },
        )
        .map(|(_, _, acc)| acc)
        .reduce(Vec::new, |mut a, mut b| {
            a.append(&mut b);
            a
        })
}

/// Surface distances of both directions (see the module doc); `None` when either mask is
/// empty. Errors on shape mismatch or bad spacing.
pub fn surface_distances(
    pred: &ArrayView3<bool>,
    reference: &ArrayView3<bool>,
    spacing_xyz: [f64; 3],
) -> Result<Option<SurfaceDistances>> {
    check_shapes(pred, reference)?;
    check_spacing(spacing_xyz)?;
    let o = overlap(pred, reference);
    Ok(surface_distances_in(pred, reference, spacing_xyz, &o))
}

fn surface_distances_in(
    pred: &ArrayView3<bool>,
    reference: &ArrayView3<bool>,
    spacing_xyz: [f64; 3],
    o: &Overlap,
) -> Option<SurfaceDistances> {
    if o.pred == 0 || o.reference == 0 {
        return None;
    }
    // Every surface voxel, and so every nearest feature, lies in the bounding box of P ∪ R, and
    // cropping to it changes no surface (outside the box is background either way); the
    // distance transform then runs on the box only.
    let (lo, hi) = (o.lo, o.hi);
    let crop = s![lo[0]..=hi[0], lo[1]..=hi[1], lo[2]..=hi[2]];
    let ps = surface(&pred.slice(crop));
    let rs = surface(&reference.slice(crop));
    let sp = [spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]];
    let mut buf = Array3::<f64>::zeros(ps.raw_dim());
    let pred_to_ref = distances_at(&rs.view(), &ps, sp, &mut buf);
    let ref_to_pred = distances_at(&ps.view(), &rs, sp, &mut buf);
    Some(SurfaceDistances { pred_to_ref, ref_to_pred })
}

/// numpy's `np.percentile(values, q)` with its default ("linear") method, including its
/// two-sided interpolation formula, so results match numpy to the last bits. `None` if empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 || !(0.0..=100.0).contains(&q) || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let virtual_index = (n - 1) as f64 * (q / 100.0);
    let lo = (virtual_index.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let t = virtual_index - lo as f64;
    let mut v = values.to_vec();
    let (_, &mut a, rest) = v.select_nth_unstable_by(lo, f64::total_cmp);
    let b = if hi == lo { a } else { rest.iter().copied().fold(f64::INFINITY, f64::min) };
    let diff = b - a;
    Some(if t >= 0.5 { b - diff * (1.0 - t) } else { a + diff * t })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Dice of one class between two label maps of the same shape (1 when neither has it, as
/// `binary_metrics`), without the surface distances: for scoring many volumes quickly.
pub fn class_dice(pred: &ArrayView3<u8>, reference: &ArrayView3<u8>, class: u8) -> Result<f64> {
    check_shapes(pred, reference)?;
    let (mut both, mut p, mut r) = (0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(reference.iter()) {
        let (x, y) = (a == class, b == class);
        both += (x && y) as u64;
        p += x as u64;
        r += y as u64;
    }
    Ok(if p + r == 0 { 1.0 } else { 2.0 * both as f64 / (p + r) as f64 })
}

/// All metrics of a binary prediction against a binary reference; masks `[nz, ny, nx]`,
/// `spacing_xyz` = `[sx, sy, sz]` in mm. Errors on shape mismatch or non-positive spacing.
pub fn binary_metrics(
    pred: &ArrayView3<bool>,
    reference: &ArrayView3<bool>,
    spacing_xyz: [f64; 3],
) -> Result<BinaryMetrics> {
    check_shapes(pred, reference)?;
    check_spacing(spacing_xyz)?;
    let o = overlap(pred, reference);
    let union = o.pred + o.reference - o.both;
    let (dice, jaccard) =
        if union == 0 { (1.0, 1.0) } else { (2.0 * o.both as f64 / (o.pred + o.reference) as f64, o.both as f64 / union as f64) };
    let mut m = BinaryMetrics {
        dice,
        jaccard,
        asd: None,
        assd: None,
        hd: None,
        hd95: None,
        pred_voxels: o.pred,
        ref_voxels: o.reference,
    };
    if union == 0 {
        (m.asd, m.assd, m.hd, m.hd95) = (Some(0.0), Some(0.0), Some(0.0), Some(0.0));
    } else if let Some(sd) = surface_distances_in(pred, reference, spacing_xyz, &o) {
        let mut pooled = sd.pred_to_ref.clone();
        pooled.extend_from_slice(&sd.ref_to_pred);
        m.asd = Some(mean(&sd.pred_to_ref));
        m.assd = Some(mean(&pooled));
        m.hd = pooled.iter().copied().reduce(f64::max);
        m.hd95 = percentile(&pooled, 95.0);
    }
    Ok(m)
}

/// Per-class metrics of two label maps: for each `class`, the voxels equal to it in `pred`
/// against those equal to it in `reference`. The reference's spacing is used; the prediction
/// must have the same shape and spacing (relative difference ≤ 1e-4, allowing for float32
/// headers), since a prediction on another grid cannot be compared voxel by voxel.
pub fn evaluate_labels<P: Voxel, R: Voxel>(
    pred: &Volume<P>,
    reference: &Volume<R>,
    classes: &[u16],
) -> Result<Vec<ClassMetrics>> {
    if pred.data.shape() != reference.data.shape() {
        return Err(Error::invalid(format!(
            "metrics: prediction dims {:?} differ from reference dims {:?}",
            pred.dims(),
            reference.dims()
        )));
    }
    let (ps, rs) = (pred.geometry.spacing, reference.geometry.spacing);
    check_spacing(rs)?;
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs(); // false for NaN
    if !ps.iter().zip(&rs).all(|(&a, &b)| same(a, b)) {
        return Err(Error::invalid(format!("metrics: prediction spacing {ps:?} differs from reference spacing {rs:?}")));
    }
    classes
        .iter()
        .map(|&c| {
            let c64 = c as f64;
            let p = pred.data.map(|v| v.to_f64() == c64);
            let r = reference.data.map(|v| v.to_f64() == c64);
            Ok(ClassMetrics::new(c, binary_metrics(&p.view(), &r.view(), rs)?))
        })
        .collect()
}

/// The non-zero label values present in a label map, sorted; an error for values that are not
/// integers in 0..=65535 (e.g. an intensity image passed by mistake).
pub fn classes_present<T: Voxel>(labels: &Volume<T>) -> Result<Vec<u16>> {
    let mut seen = vec![false; 1 << 16];
    for v in labels.data.iter() {
        let f = v.to_f64();
        if !(f.fract() == 0.0 && (0.0..=65535.0).contains(&f)) {
            return Err(Error::invalid(format!("metrics: label value {f} is not an integer in 0..=65535")));
        }
        seen[f as usize] = true;
    }
    Ok((1..=u16::MAX).filter(|&c| seen[c as usize]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute-force surface (explicit 6-neighbour check with out-of-bounds = background).
    fn brute_surface(m: &Array3<bool>) -> Vec<[usize; 3]> {
        let sh = m.shape();
        let mut out = Vec::new();
        for ((k, j, i), &v) in m.indexed_iter() {
            if !v {
                continue;
            }
            let idx = [k as isize, j as isize, i as isize];
            let mut border = false;
            for ax in 0..3 {
                for d in [-1isize, 1] {
                    let mut n = idx;
                    n[ax] += d;
                    let inside = (0..3).all(|a| n[a] >= 0 && (n[a] as usize) < sh[a]);
                    if !inside || !m[[n[0] as usize, n[1] as usize, n[2] as usize]] {
                        border = true;
                    }
                }
            }
            if border {
                out.push([k, j, i]);
            }
        }
        out
    }

    fn brute_dist(a: &[[usize; 3]], b: &[[usize; 3]], sp_xyz: [f64; 3]) -> Vec<f64> {
        let sp = [sp_xyz[2], sp_xyz[1], sp_xyz[0]];
        a.iter()
            .map(|p| {
                b.iter()
                    .map(|q| (0..3).map(|ax| ((p[ax] as f64 - q[ax] as f64) * sp[ax]).powi(2)).sum::<f64>().sqrt())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(f64::total_cmp);
        v
    }

    fn cube(shape: (usize, usize, usize), lo: [usize; 3], hi: [usize; 3]) -> Array3<bool> {
        Array3::from_shape_fn(shape, |(k, j, i)| {
            (lo[0]..hi[0]).contains(&k) && (lo[1]..hi[1]).contains(&j) && (lo[2]..hi[2]).contains(&i)
        })
    }

    #[test]
    fn class_dice_is_binary_metrics_dice_per_class() {
        // Two label maps: class 1 a cube and its shift (Dice 0.75), class 2 absent from both (1).
        let lab = |m: &Array3<bool>| m.mapv(|v| v as u8);
        let a = lab(&cube((8, 8, 8), [1, 1, 1], [5, 5, 5]));
        let b = lab(&cube((8, 8, 8), [1, 1, 2], [5, 5, 6]));
        assert!((class_dice(&a.view(), &b.view(), 1).unwrap() - 0.75).abs() < 1e-15);
        assert_eq!(class_dice(&a.view(), &b.view(), 2).unwrap(), 1.0);
        assert_eq!(class_dice(&a.view(), &b.view(), 0).unwrap(), binary_metrics(&a.mapv(|v| v == 0).view(), &b.mapv(|v| v == 0).view(), [1.0; 3]).unwrap().dice);
        assert!(class_dice(&a.view(), &b.slice(ndarray::s![..4, .., ..]).view(), 1).is_err(), "shapes differ");
    }

    #[test]
    fn single_voxels_anisotropic_distance() {
        let mut p = Array3::from_elem((5, 4, 3), false);
        let mut r = p.clone();
        p[[1, 1, 1]] = true;
        r[[3, 2, 1]] = true;
        // axis 0 (k) uses sz = 2.0, axis 1 (j) sy = 1.0: sqrt((2·2)² + (1·1)²)
        let m = binary_metrics(&p.view(), &r.view(), [0.5, 1.0, 2.0]).unwrap();
        let d = 17f64.sqrt();
        assert_eq!((m.dice, m.jaccard), (0.0, 0.0));
        for v in [m.asd, m.assd, m.hd, m.hd95] {
            assert!((v.unwrap() - d).abs() < 1e-12, "{v:?}");
        }
    }

    #[test]
    fn cube_shifted_along_x_hand_computed() {
        // 4³ cube vs the same shifted by one voxel along i (sx = 0.7, the smallest spacing).
        // Each surface has 56 voxels, 20 of them at distance sx (the face left behind and the
        // 4 inner voxels of the opposite face), 36 at 0. Intersection 48, union 80.
        let a = cube((8, 8, 8), [1, 1, 1], [5, 5, 5]);
        let b = cube((8, 8, 8), [1, 1, 2], [5, 5, 6]);
        let m = binary_metrics(&a.view(), &b.view(), [0.7, 1.1, 2.0]).unwrap();
        assert!((m.dice - 0.75).abs() < 1e-15);
        assert!((m.jaccard - 0.6).abs() < 1e-15);
        assert!((m.asd.unwrap() - 20.0 * 0.7 / 56.0).abs() < 1e-12);
        assert!((m.assd.unwrap() - 0.25).abs() < 1e-12);
        assert!((m.hd.unwrap() - 0.7).abs() < 1e-12);
        assert!((m.hd95.unwrap() - 0.7).abs() < 1e-12);
        assert_eq!((m.pred_voxels, m.ref_voxels), (64, 64));
    }

    #[test]
    fn asd_is_one_directional() {
        // P is a 1-voxel-thick slab inside R's region: P→R and R→P differ.
        let r = cube((9, 9, 9), [0, 0, 0], [9, 9, 9]);
        let p = cube((9, 9, 9), [4, 4, 4], [5, 5, 5]);
        let m = binary_metrics(&p.view(), &r.view(), [1.0, 1.0, 1.0]).unwrap();
        // single P voxel at the centre is 4 voxels from every face of R
        assert!((m.asd.unwrap() - 4.0).abs() < 1e-12);
        let rev = binary_metrics(&r.view(), &p.view(), [1.0, 1.0, 1.0]).unwrap();
        assert!(rev.asd.unwrap() > 4.0);
        assert_eq!(m.assd, rev.assd);
        assert_eq!(m.hd95, rev.hd95);
    }

    #[test]
    fn object_touching_the_array_edge_has_surface_there() {
        // A full 3×3×3 mask: every voxel but the centre is on the surface (outside = background).
        let full = Array3::from_elem((3, 3, 3), true);
        let s = surface(&full.view());
        assert_eq!(s.iter().filter(|&&v| v).count(), 26);
        assert!(!s[[1, 1, 1]]);
    }

    #[test]
    fn empty_masks_follow_documented_convention() {
        let e = Array3::from_elem((4, 4, 4), false);
        let mut one = e.clone();
        one[[1, 2, 3]] = true;
        let both = binary_metrics(&e.view(), &e.view(), [1.0; 3]).unwrap();
        assert_eq!((both.dice, both.jaccard), (1.0, 1.0));
        assert_eq!((both.asd, both.assd, both.hd, both.hd95), (Some(0.0), Some(0.0), Some(0.0), Some(0.0)));
        for m in [binary_metrics(&e.view(), &one.view(), [1.0; 3]).unwrap(), binary_metrics(&one.view(), &e.view(), [1.0; 3]).unwrap()] {
            assert_eq!((m.dice, m.jaccard), (0.0, 0.0));
            assert_eq!((m.asd, m.assd, m.hd, m.hd95), (None, None, None, None));
        }
        let zero = Array3::from_elem((0, 3, 3), false);
        assert_eq!(binary_metrics(&zero.view(), &zero.view(), [1.0; 3]).unwrap().dice, 1.0);
    }

    #[test]
    fn bad_input_is_an_error() {
        let a = Array3::from_elem((4, 4, 4), true);
        let b = Array3::from_elem((4, 4, 5), true);
        let e = binary_metrics(&a.view(), &b.view(), [1.0; 3]).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        for sp in [[1.0, 0.0, 1.0], [1.0, -1.0, 1.0], [f64::NAN, 1.0, 1.0]] {
            assert!(binary_metrics(&a.view(), &a.view(), sp).is_err());
            assert!(distance_transform(&a.view(), sp).is_err());
        }
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1, 2, 3, 4, 5], 95) == 4.8; [3, 1, 2] at 50 -> 2.0; one value -> itself
        assert!((percentile(&[5.0, 1.0, 4.0, 2.0, 3.0], 95.0).unwrap() - 4.8).abs() < 1e-15);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.5], 95.0), Some(7.5));
        // np.percentile([0, 10], 95) == 9.5 (the t >= 0.5 branch), [0, 10] at 20 -> 2.0
        assert_eq!(percentile(&[0.0, 10.0], 95.0), Some(9.5));
        assert_eq!(percentile(&[10.0, 0.0], 20.0), Some(2.0));
        assert_eq!(percentile(&[], 95.0), None);
    }

    #[test]
    fn distance_transform_without_features_is_infinite() {
        let e = Array3::from_elem((2, 3, 4), false);
        assert!(distance_transform(&e.view(), [1.0; 3]).unwrap().iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn evaluate_labels_per_class_and_checks() {
        let g = crate::Geometry { spacing: [0.7, 1.1, 2.0], ..Default::default() };
        let mut p = Array3::<u8>::zeros((8, 8, 8));
        let mut r = Array3::<u16>::zeros((8, 8, 8));
        p.slice_mut(s![1..5, 1..5, 2..6]).fill(1);
        r.slice_mut(s![1..5, 1..5, 1..5]).fill(1);
        r[[7, 7, 7]] = 2; // class 2 only in the reference; class 3 in neither
        let res = evaluate_labels(&Volume::new(p.clone(), g), &Volume::new(r.clone(), g), &[1, 2, 3]).unwrap();
        assert_eq!(res.len(), 3);
        assert_eq!(res[0].class, 1);
        assert!((res[0].dice - 0.75).abs() < 1e-15 && (res[0].hd95.unwrap() - 0.7).abs() < 1e-12);
        assert_eq!((res[1].dice, res[1].hd95), (0.0, None));
        assert_eq!((res[2].dice, res[2].hd95), (1.0, Some(0.0)));
        let json = serde_json::to_string(&res[1]).unwrap();
        assert!(json.contains("\"hd95\":null"), "{json}");
        let other = crate::Geometry { spacing: [0.7, 1.1, 2.5], ..Default::default() };
        assert!(evaluate_labels(&Volume::new(p.clone(), other), &Volume::new(r.clone(), g), &[1]).is_err());
        let small = Array3::<u8>::zeros((8, 8, 7));
        let e = evaluate_labels(&Volume::new(small, g), &Volume::new(r.clone(), g), &[1]).unwrap_err().to_string();
        assert!(e.contains("dims"), "{e}");
        assert_eq!(classes_present(&Volume::new(r, g)).unwrap(), vec![1, 2]);
        assert!(classes_present(&Volume::new(Array3::from_elem((1, 1, 1), 0.5f32), g)).is_err());
    }

    fn mask_strategy() -> impl Strategy<Value = (Array3<bool>, Array3<bool>, [f64; 3])> {
        // Sparse masks in larger arrays exercise the bounding-box crop; dense ones the edges.
        (1usize..10, 1usize..10, 1usize..10, 0.02f64..0.6).prop_flat_map(|(a, b, c, w)| {
            let n = a * b * c;
            (
                proptest::collection::vec(proptest::bool::weighted(w), n),
                proptest::collection::vec(proptest::bool::weighted(w), n),
                [0.3f64..3.0, 0.3f64..3.0, 0.3f64..3.0],
            )
                .prop_map(move |(p, r, sp)| {
                    (Array3::from_shape_vec((a, b, c), p).unwrap(), Array3::from_shape_vec((a, b, c), r).unwrap(), sp)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The EDT is exact: it equals the brute-force minimum over all features.
        #[test]
        fn edt_matches_brute_force((f, _, sp) in mask_strategy()) {
            let d = distance_transform(&f.view(), sp).unwrap();
            let feats: Vec<[usize; 3]> = f.indexed_iter().filter(|(_, &v)| v).map(|((k, j, i), _)| [k, j, i]).collect();
            let all: Vec<[usize; 3]> = f.indexed_iter().map(|((k, j, i), _)| [k, j, i]).collect();
            let want = brute_dist(&all, &feats, sp);
            for (got, want) in d.iter().zip(want) {
                prop_assert!(got == &want || (got - want).abs() < 1e-9, "{} vs {}", got, want);
            }
        }

        /// Surfaces and both directions of surface distances equal a brute-force computation,
        /// bounding-box cropping included.
        #[test]
        fn surface_distances_match_brute_force((p, r, sp) in mask_strategy()) {
            let got = surface_distances(&p.view(), &r.view(), sp).unwrap();
            let (bp, br) = (brute_surface(&p), brute_surface(&r));
            let sp_ok = surface(&p.view());
            prop_assert_eq!(sp_ok.iter().filter(|&&v| v).count(), bp.len());
            for q in &bp { prop_assert!(sp_ok[*q]); }
            match got {
                None => prop_assert!(bp.is_empty() || br.is_empty()),
                Some(sd) => {
                    let (w1, w2) = (sorted(brute_dist(&bp, &br, sp)), sorted(brute_dist(&br, &bp, sp)));
                    let (g1, g2) = (sorted(sd.pred_to_ref), sorted(sd.ref_to_pred));
                    prop_assert_eq!(g1.len(), w1.len());
                    prop_assert_eq!(g2.len(), w2.len());
                    for (a, b) in g1.iter().zip(&w1).chain(g2.iter().zip(&w2)) {
                        prop_assert!((a - b).abs() < 1e-9, "{} vs {}", a, b);
                    }
                }
            }
        }
    }
}
