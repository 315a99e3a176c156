//! `Volume<T>`: a 3D voxel array plus its physical geometry, as ITK sees it.
//!
//! Memory layout is x-fastest (i, then j, then k), the layout of ITK, VTK, NIfTI and Slicer's
//! `arrayFromVolume`. The ndarray therefore has shape `[nz, ny, nx]` in standard (C) order and
//! is indexed `data[[k, j, i]]`, exactly like numpy's `[k, j, i]` in Slicer. Nothing here ever
//! transposes.
use crate::error::{Error, Result};
use ndarray::{Array3, ArrayView3};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// ITK geometry in LPS: physical point = origin + direction · diag(spacing) · (i, j, k).
/// `direction` is row-major 3×3; column c is the direction of voxel axis c.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    pub origin: [f64; 3],
    pub spacing: [f64; 3],
    pub direction: [f64; 9],
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry { origin: [0.0; 3], spacing: [1.0; 3], direction: IDENTITY3 }
    }
}

pub const IDENTITY3: [f64; 9] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];

impl Geometry {
    /// LPS physical point of a continuous voxel index (i, j, k).
    pub fn index_to_physical(&self, ijk: [f64; 3]) -> [f64; 3] {
        let mut p = self.origin;
        for (r, pr) in p.iter_mut().enumerate() {
            for c in 0..3 {
                *pr += self.direction[3 * r + c] * self.spacing[c] * ijk[c];
            }
        }
        p
    }

    /// Checks that spacing is positive and finite and the direction is a (near-)orthonormal
    /// matrix; NIfTI files and C callers can hand us anything.
    pub fn validate(&self) -> Result<()> {
        if self.spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(Error::invalid(format!("spacing must be positive and finite, got {:?}", self.spacing)));
        }
        if self.origin.iter().chain(self.direction.iter()).any(|v| !v.is_finite()) {
            return Err(Error::invalid("origin and direction must be finite"));
        }
        for a in 0..3 {
            for b in 0..3 {
                let dot: f64 = (0..3).map(|r| self.direction[3 * r + a] * self.direction[3 * r + b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                if (dot - want).abs() > 1e-3 {
                    return Err(Error::invalid(format!(
                        "direction matrix is not orthonormal (columns {a},{b} dot = {dot:.6})"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Largest absolute difference of any origin/spacing/direction entry.
    pub fn max_abs_diff(&self, other: &Geometry) -> f64 {
        let a = self.origin.iter().chain(&self.spacing).chain(&self.direction);
        let b = other.origin.iter().chain(&other.spacing).chain(&other.direction);
        a.zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }
}

impl Geometry {
    /// The grid of the same physical extent (the same field of view, edge to edge) with
    /// `to` voxels (i, j, k) instead of `from`: spacing `s·from/to`, and the origin moved to
    /// the centre of the new first voxel. This is the grid [`resize_linear`] samples.
    pub fn resized(&self, from: [usize; 3], to: [usize; 3]) -> Geometry {
        let first = [0, 1, 2].map(|a| 0.5 * from[a] as f64 / to[a] as f64 - 0.5);
        Geometry {
            origin: self.index_to_physical(first),
            spacing: [0, 1, 2].map(|a| self.spacing[a] * from[a] as f64 / to[a] as f64),
            direction: self.direction,
        }
    }

    /// Voxels (i, j, k) of the grid of the same field of view at (about) `spacing`: each axis
    /// of `dims` scaled by its spacing ratio and rounded, at least 1. Equal to `dims` when
    /// the spacings differ by less than half a voxel over the volume.
    pub fn dims_at_spacing(&self, dims: [usize; 3], spacing: [f64; 3]) -> [usize; 3] {
        [0, 1, 2].map(|a| ((dims[a] as f64 * self.spacing[a] / spacing[a]).round() as usize).max(1))
    }
}

/// Trilinear resampling of `[nz, ny, nx]` voxels to `shape` (`[nz', ny', nx']`) over the same
/// field of view: voxel centres map as `src = (dst + 0.5)·n/n' − 0.5`, clamped at the edges
/// (PyTorch's `interpolate(mode="trilinear", align_corners=False)`, ITK's linear resampling
/// onto [`Geometry::resized`]). Every output is a convex combination of inputs, so class
/// probabilities stay probabilities. Separable: one pass per axis.
pub fn resize_linear(v: &ArrayView3<f32>, shape: [usize; 3]) -> Array3<f32> {
    // The input is read in place by the first pass that changes an axis; copied only when none does.
    let mut owned: Option<Array3<f32>> = None;
    for axis in 0..3 {
        let cur = owned.as_ref().map(|a| a.view()).unwrap_or_else(|| v.view());
        let n = cur.shape()[axis];
        let m = shape[axis];
        if n == m {
            continue;
        }
        // Per output index along the axis: the two inputs and the weight of the second.
        let taps: Vec<(usize, usize, f32)> = (0..m)
            .map(|j| {
                let src = ((j as f64 + 0.5) * n as f64 / m as f64 - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n - 1);
                let i1 = (i0 + 1).min(n - 1);
                (i0, i1, (src - i0 as f64).min(1.0) as f32)
            })
            .collect();
        let mut dims = [cur.shape()[0], cur.shape()[1], cur.shape()[2]];
        dims[axis] = m;
        let mut out = Array3::<f32>::zeros(dims);
        let src = &cur;
        ndarray::Zip::indexed(&mut out).par_for_each(|(k, j, i), o| {
            let mut at = [k, j, i];
            let (i0, i1, w) = taps[at[axis]];
            at[axis] = i0;
            let a = src[at];
            at[axis] = i1;
            let b = src[at];
            *o = a + w * (b - a);
        });
        owned = Some(out);
    }
    owned.unwrap_or_else(|| v.to_owned())
}

/// A 3D volume: voxels `[k, j, i]` (x fastest) plus geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T> {
    pub data: Array3<T>,
    pub geometry: Geometry,
}

impl<T> Volume<T> {
    pub fn new(data: Array3<T>, geometry: Geometry) -> Self {
        Volume { data, geometry }
    }
    /// Size along i, j, k (ITK's `GetSize()` order).
    pub fn dims(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[2], s[1], s[0]]
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Same geometry, other voxels (e.g. a label map computed from this image).
    pub fn with_data<U>(&self, data: Array3<U>) -> Result<Volume<U>> {
        if data.shape() != self.data.shape() {
            return Err(Error::invalid(format!(
                "shape {:?} does not match the volume's {:?}",
                data.shape(),
                self.data.shape()
            )));
        }
        Ok(Volume { data, geometry: self.geometry })
    }
    /// Build from an x-fastest buffer of dims (nx, ny, nz).
    pub fn from_vec(dims: [usize; 3], data: Vec<T>, geometry: Geometry) -> Result<Self> {
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(Error::invalid(format!("buffer of {} voxels does not fit dims {:?}", data.len(), dims)));
        }
        let data = Array3::from_shape_vec((dims[2], dims[1], dims[0]), data).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(Volume { data, geometry })
    }
}

/// Voxel types a volume can have on disk and across the C ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::U16 => "u16",
            DType::I16 => "i16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Voxel element types; `to_f64`/`from_f64` are the only conversions (from_f64 saturates and
/// rounds, so a label volume never wraps).
pub trait Voxel: Copy + Send + Sync + PartialEq + std::fmt::Debug + Default + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! int_voxel {
    ($t:ty, $d:ident) => {
        impl Voxel for $t {
            const DTYPE: DType = DType::$d;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v.round() as $t // `as` saturates and maps NaN to 0
            }
        }
    };
}
int_voxel!(u8, U8);
int_voxel!(i8, I8);
int_voxel!(u16, U16);
int_voxel!(i16, I16);
int_voxel!(u32, U32);
int_voxel!(i32, I32);
impl Voxel for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl Voxel for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl<T: Voxel> Volume<T> {
    /// Convert voxel type, keeping geometry.
    pub fn cast<U: Voxel>(&self) -> Volume<U> {
        Volume { data: self.data.mapv(|v| U::from_f64(v.to_f64())), geometry: self.geometry }
    }
    /// (min, max) over all voxels, ignoring NaN; None for an empty or all-NaN volume.
    pub fn min_max(&self) -> Option<(f64, f64)> {
        self.data.iter().map(|v| v.to_f64()).filter(|v| !v.is_nan()).fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
    }
}

/// A volume of any supported voxel type, as read from a file.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyVolume {
    U8(Volume<u8>),
    I8(Volume<i8>),
    U16(Volume<u16>),
    I16(Volume<i16>),
    U32(Volume<u32>),
    I32(Volume<i32>),
    F32(Volume<f32>),
    F64(Volume<f64>),
}

/// Run `$body` with `$v` bound to the inner `Volume<T>`, whatever T is.
#[macro_export]
macro_rules! with_volume {
    ($any:expr, $v:ident => $body:expr) => {
        match $any {
            $crate::volume::AnyVolume::U8($v) => $body,
            $crate::volume::AnyVolume::I8($v) => $body,
            $crate::volume::AnyVolume::U16($v) => $body,
            $crate::volume::AnyVolume::I16($v) => $body,
            $crate::volume::AnyVolume::U32($v) => $body,
            $crate::volume::AnyVolume::I32($v) => $body,
            $crate::volume::AnyVolume::F32($v) => $body,
            $crate::volume::AnyVolume::F64($v) => $body,
        }
    };
}

impl AnyVolume {
    pub fn dtype(&self) -> DType {
        with_volume!(self, v => dtype_of(v))
    }
    pub fn geometry(&self) -> &Geometry {
        with_volume!(self, v => &v.geometry)
    }
    pub fn dims(&self) -> [usize; 3] {
        with_volume!(self, v => v.dims())
    }
    pub fn min_max(&self) -> Option<(f64, f64)> {
        with_volume!(self, v => v.min_max())
    }
    /// Any volume as `Volume<U>` (e.g. f32 for images, u8/u16 for labels).
    pub fn cast<U: Voxel>(&self) -> Volume<U> {
        with_volume!(self, v => v.cast::<U>())
    }
}

fn dtype_of<T: Voxel>(_: &Volume<T>) -> DType {
    T::DTYPE
}

macro_rules! from_volume {
    ($t:ty, $d:ident) => {
        impl From<Volume<$t>> for AnyVolume {
            fn from(v: Volume<$t>) -> Self {
                AnyVolume::$d(v)
            }
        }
    };
}
from_volume!(u8, U8);
from_volume!(i8, I8);
from_volume!(u16, U16);
from_volume!(i16, I16);
from_volume!(u32, U32);
from_volume!(i32, I32);
from_volume!(f32, F32);
from_volume!(f64, F64);

/// Per-volume z-score (intensities differ wildly between files and scanners). A NaN or
/// infinite voxel is an error; a constant image has nothing to normalise and becomes zeros
/// (logged).
pub fn zscore(v: &ArrayView3<f32>, what: &str) -> Result<Array3<f32>> {
    Normalization::ZscorePerVolume.apply(v, what)
}

/// The mean and standard deviation of a volume for its z-score; None for a constant image.
fn zscore_stats(v: &ArrayView3<f32>, what: &str) -> Result<Option<(f64, f64)>> {
    let n = v.len() as f64;
    // Sums in f64 over z-slices in parallel (a CT volume is ~10^8 voxels), added in slice order
    // so that the result does not depend on the thread count.
    let slice_sums = |f: &(dyn Fn(f32) -> f64 + Sync)| -> f64 {
        let per_slice: Vec<f64> = v.outer_iter().into_par_iter().map(|sl| sl.iter().map(|&x| f(x)).sum::<f64>()).collect();
        per_slice.iter().sum()
    };
    let mean = slice_sums(&|x| x as f64) / n;
    let var = slice_sums(&|x| (x as f64 - mean).powi(2)) / n;
    let std = var.sqrt();
    if std < 1e-8 * mean.abs().max(1.0) {
        log::warn!("{what}: constant image (all voxels {mean}); normalised to zeros");
        return Ok(None);
    }
    Ok(Some((mean, std)))
}

/// The numbers of nnU-Net's CT normalisation, measured on the labelled foreground (every voxel
/// of a class > 0) of the training cases, in the scanner's units (Hounsfield units are absolute,
/// so one window serves every scan): the 0.5th and 99.5th percentiles to clip to, then the mean
/// and standard deviation (of the unclipped voxels) to standardise with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtWindow {
    pub clip: [f32; 2],
    pub mean: f64,
    pub std: f64,
}

impl CtWindow {
    /// The window's numbers of `values` (reordered): nearest-rank percentiles, plain mean and
    /// standard deviation. None when there are none. Not checked: [`Normalization::ct`] does.
    pub fn of_values(values: &mut [f32]) -> Option<CtWindow> {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let (lo, hi) = quantile_pair(values, (0.005, 0.995))?;
        Some(CtWindow { clip: [lo, hi], mean, std })
    }
}

/// How a volume's intensities are made comparable before the network sees them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalization {
    /// Each volume by its own mean and standard deviation ([`zscore`]): MRI intensities have no
    /// absolute scale, so only a volume's own statistics mean anything.
    ZscorePerVolume,
    /// One window for every volume ([`CtWindow`]): a CT's values mean the same tissue in every
    /// scan, and a per-volume z-score would shift with how much air the field of view holds.
    Ct(CtWindow),
}

impl Normalization {
    /// Names as the model file records them.
    pub const ZSCORE: &'static str = "zscore-per-volume";
    pub const CT: &'static str = "ct-foreground";

    pub fn name(&self) -> &'static str {
        match self {
            Normalization::ZscorePerVolume => Self::ZSCORE,
            Normalization::Ct(_) => Self::CT,
        }
    }

    pub fn window(&self) -> Option<CtWindow> {
        match self {
            Normalization::ZscorePerVolume => None,
            Normalization::Ct(w) => Some(*w),
        }
    }

    /// From a model file's name and window ("zscore" is the name files of the first format
    /// version carry).
    pub fn from_parts(name: &str, window: Option<CtWindow>) -> Result<Normalization> {
        match (name, window) {
            (Self::ZSCORE | "zscore", None) => Ok(Normalization::ZscorePerVolume),
            (Self::CT, Some(w)) => Self::ct(w, &format!("normalization {}", Self::CT)),
            (Self::CT, None) => Err(Error::invalid(format!("normalization {} needs its window (clip, mean, std)", Self::CT))),
            (Self::ZSCORE | "zscore", Some(_)) => Err(Error::invalid(format!("normalization {name} takes no window"))),
            (other, _) => Err(Error::invalid(format!("unknown normalization \"{other}\" ({} or {})", Self::ZSCORE, Self::CT))),
        }
    }

    /// CT normalisation by `w`, if it can standardise: finite numbers, clip low <= high, and a
    /// spread (the one rule for training, `sfr plan` and model files).
    pub fn ct(w: CtWindow, what: &str) -> Result<Normalization> {
        let finite = w.clip.iter().all(|c| c.is_finite()) && w.mean.is_finite() && w.std.is_finite();
        if !finite || w.clip[1] < w.clip[0] {
            return Err(Error::invalid(format!("{what}: invalid CT window {w:?} (finite numbers, clip low <= high)")));
        }
        if !(w.std > 1e-6 * w.mean.abs().max(1.0)) {
            return Err(Error::invalid(format!("{what}: every labelled foreground voxel has the value {}: CT normalisation has no spread to standardise by", w.mean)));
        }
        Ok(Normalization::Ct(w))
    }

    /// The CT window of foreground voxel values (reordered). An error when there are none, or
    /// when they are all one value (nothing to standardise by).
    pub fn ct_from_foreground(values: &mut [f32], what: &str) -> Result<Normalization> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("{what}: the foreground contains NaN or infinite voxels")));
        }
        let w = CtWindow::of_values(values).ok_or_else(|| Error::invalid(format!("{what}: CT normalisation needs labelled foreground voxels, and the labels have none")))?;
        Self::ct(w, what)
    }

    /// The map of this volume's voxels: clip to a window, then (x - mean) / std; None (every
    /// voxel to 0) for a constant image under the z-score. A NaN or infinite voxel, or an empty
    /// image, is an error named by `what`.
    fn voxel_map(&self, v: &ArrayView3<f32>, what: &str) -> Result<Option<([f32; 2], f64, f64)>> {
        if v.is_empty() {
            return Err(Error::invalid(format!("{what}: empty image")));
        }
        if v.outer_iter().into_par_iter().any(|sl| sl.iter().any(|x| !x.is_finite())) {
            return Err(Error::invalid(format!("{what}: the image contains NaN or infinite voxels")));
        }
        Ok(match self {
            Normalization::ZscorePerVolume => zscore_stats(v, what)?.map(|(mean, std)| ([f32::NEG_INFINITY, f32::INFINITY], mean, std)),
            Normalization::Ct(w) => Some((w.clip, w.mean, w.std)),
        })
    }

    /// The normalised volume.
    pub fn apply(&self, v: &ArrayView3<f32>, what: &str) -> Result<Array3<f32>> {
        let mut out = Array3::<f32>::zeros(v.raw_dim());
        if let Some(([lo, hi], mean, std)) = self.voxel_map(v, what)? {
            ndarray::Zip::from(&mut out).and(v).par_for_each(|o, &x| *o = ((x.clamp(lo, hi) as f64 - mean) / std) as f32);
        }
        Ok(out)
    }

    /// [`Normalization::apply`] without a second volume in memory.
    pub fn apply_in_place(&self, a: &mut Array3<f32>, what: &str) -> Result<()> {
        match self.voxel_map(&a.view(), what)? {
            Some(([lo, hi], mean, std)) => a.par_mapv_inplace(|x| ((x.clamp(lo, hi) as f64 - mean) / std) as f32),
            None => a.fill(0.0),
        }
        Ok(())
    }

    /// One line for people: what is done, with its numbers.
    pub fn describe(&self) -> String {
        match self {
            Normalization::ZscorePerVolume => "per-volume z-score (each volume by its own mean and standard deviation)".into(),
            Normalization::Ct(w) => format!(
                "CT: clip to the labelled foreground's 0.5-99.5th percentiles [{}, {}], then subtract its mean {} and divide by its standard deviation {}",
                w.clip[0], w.clip[1], w.mean as f32, w.std as f32
            ),
        }
    }
}

/// The `q.0` and `q.1` quantiles (in [0, 1]; nearest rank, the lower one rounded down and the
/// upper one up) of `values`, which are reordered. None when `values` is empty.
pub fn quantile_pair(values: &mut [f32], q: (f64, f64)) -> Option<(f32, f32)> {
    let last = values.len().checked_sub(1)?;
    let lo = *values.select_nth_unstable_by((q.0 * last as f64).floor() as usize, f32::total_cmp).1;
    let hi = *values.select_nth_unstable_by((q.1 * last as f64).ceil() as usize, f32::total_cmp).1;
    Some((lo, hi))
}

/// A patch mapped to [0, 1] for an encoder trained on such images (`nn::sam::PixelInput::Unit`):
/// its 0.5th and 99.5th percentiles go to 0 and 1, values beyond are clipped. A flat patch
/// becomes zeros.
pub fn unit_range(v: &ArrayView3<f32>) -> Array3<f32> {
    let mut vals: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    match quantile_pair(&mut vals, (0.005, 0.995)) {
        Some((lo, hi)) if hi > lo => v.mapv(|x| ((x - lo) / (hi - lo)).clamp(0.0, 1.0)),
        _ => Array3::zeros(v.raw_dim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_linear_samples_a_ramp_at_the_voxel_centres() {
        // A ramp along x, f(i) = i, halved to 5 voxels: output j sits at input 2j + 0.5.
        let v = Array3::from_shape_fn((1, 1, 10), |(_, _, i)| i as f32);
        let r = resize_linear(&v.view(), [1, 1, 5]);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![0.5, 2.5, 4.5, 6.5, 8.5]);
        // Doubled to 20: centres at (j + 0.5)/2 - 0.5, clamped at the first voxel.
        let r = resize_linear(&v.view(), [1, 1, 20]);
        assert_eq!(r[[0, 0, 0]], 0.0);
        assert_eq!(r[[0, 0, 1]], 0.25);
        assert_eq!(r[[0, 0, 19]], 9.0);
        // Linear in every axis at once: an affine field is reproduced exactly inside.
        let f = |k: f64, j: f64, i: f64| (3.0 * k - 2.0 * j + 0.5 * i) as f32;
        let v = Array3::from_shape_fn((8, 6, 4), |(k, j, i)| f(k as f64, j as f64, i as f64));
        let r = resize_linear(&v.view(), [4, 12, 8]);
        for ((k, j, i), &x) in r.indexed_iter() {
            let src = |d: usize, n: f64, m: f64| ((d as f64 + 0.5) * n / m - 0.5).clamp(0.0, n - 1.0);
            let want = f(src(k, 8.0, 4.0), src(j, 6.0, 12.0), src(i, 4.0, 8.0));
            assert!((x - want).abs() < 1e-5, "{k},{j},{i}: {x} vs {want}");
        }
    }

    #[test]
    fn resized_grid_keeps_the_field_of_view() {
        let g = Geometry { origin: [10.0, -5.0, 2.0], spacing: [0.5, 1.0, 3.0], direction: [0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0] };
        let from = [40, 20, 10];
        let to = g.dims_at_spacing(from, [1.0, 1.0, 1.0]);
        assert_eq!(to, [20, 20, 30]);
        let r = g.resized(from, to);
        assert_eq!(r.spacing, [1.0, 1.0, 1.0]);
        // The outer corner of the first voxel, and of the last, are the same physical points.
        for (idx_g, idx_r) in [([-0.5; 3], [-0.5; 3]), ([39.5, 19.5, 9.5], [19.5, 19.5, 29.5])] {
            let (a, b) = (g.index_to_physical(idx_g), r.index_to_physical(idx_r));
            assert!((0..3).all(|c| (a[c] - b[c]).abs() < 1e-9), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn unit_range_clips_at_the_percentiles() {
        // 1000 values 0..999 and one outlier: the 0.5th/99.5th percentiles are 5 and 995.
        let mut v: Vec<f32> = (0..1000).map(|x| x as f32).collect();
        v.push(1e6);
        let a = Array3::from_shape_vec((7, 11, 13), v).unwrap();
        let u = unit_range(&a.view());
        assert_eq!(u[[0, 0, 0]], 0.0);
        assert_eq!(u[[6, 10, 12]], 1.0, "the outlier is clipped");
        let mid = u.as_slice().unwrap()[500];
        assert!((mid - 495.0 / 990.0).abs() < 1e-6, "{mid}");
        assert!(unit_range(&Array3::from_elem((2, 2, 2), 3.0f32).view()).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn ct_normalisation_clips_to_the_foreground_window_then_standardises() {
        // Foreground voxels 0..=999 (HU): window [4, 995] (nearest rank), mean 499.5.
        let mut fg: Vec<f32> = (0..1000).map(|v| v as f32).collect();
        let n = Normalization::ct_from_foreground(&mut fg, "t").unwrap();
        let w = n.window().unwrap();
        assert_eq!(w.clip, [4.0, 995.0]);
        assert!((w.mean - 499.5).abs() < 1e-9 && (w.std - 288.67499).abs() < 1e-3, "{w:?}");
        // Air at -1000 and at -3000 both clip to the window's low end: the same value, unlike
        // a z-score, which moves with the amount and value of the air.
        let img = Array3::from_shape_vec((1, 1, 4), vec![-1000.0f32, -3000.0, 499.5, 5000.0]).unwrap();
        let out = n.apply(&img.view(), "t").unwrap();
        let low = ((4.0 - 499.5) / w.std) as f32;
        assert_eq!(out.as_slice().unwrap()[..2], [low, low]);
        assert!(out[[0, 0, 2]].abs() < 1e-6);
        assert_eq!(out[[0, 0, 3]], ((995.0 - 499.5) / w.std) as f32);
        // The names a model file carries, old and new, and windows that cannot be right.
        assert_eq!(Normalization::from_parts("zscore", None).unwrap(), Normalization::ZscorePerVolume);
        assert_eq!(Normalization::from_parts(n.name(), n.window()).unwrap(), n);
        for (name, win) in [("ct-foreground", None), ("ct-foreground", Some(CtWindow { std: 0.0, ..w })), ("zscore-per-volume", Some(w)), ("minmax", None)] {
            assert!(Normalization::from_parts(name, win).is_err(), "{name} {win:?}");
        }
        assert!(Normalization::ct_from_foreground(&mut [], "t").unwrap_err().to_string().contains("no"));
        assert!(Normalization::ct_from_foreground(&mut [7.0; 5], "t").unwrap_err().to_string().contains("spread"));
        let nan = Array3::from_elem((1, 1, 2), f32::NAN);
        assert!(n.apply(&nan.view(), "t").unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn zscore_and_bad_images() {
        let a = Array3::from_shape_fn((2, 3, 4), |(k, j, i)| (k * 12 + j * 4 + i) as f32);
        let z = zscore(&a.view(), "t").unwrap();
        let mean: f32 = z.iter().sum::<f32>() / 24.0;
        let var: f32 = z.iter().map(|v| v * v).sum::<f32>() / 24.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
        let mut nan = a.clone();
        nan[[1, 1, 1]] = f32::NAN;
        assert!(zscore(&nan.view(), "t").unwrap_err().to_string().contains("NaN"));
        let c = Array3::from_elem((2, 2, 2), 7.0f32);
        assert!(zscore(&c.view(), "t").unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn layout_is_x_fastest() {
        let v = Volume::from_vec([3, 2, 2], (0..12u8).collect(), Geometry::default()).unwrap();
        assert_eq!(v.dims(), [3, 2, 2]);
        // voxel (i=1, j=0, k=1) is at flat index 1 + 0*3 + 1*6 = 7
        assert_eq!(v.data[[1, 0, 1]], 7);
        assert_eq!(v.data.as_slice().unwrap()[7], 7);
    }

    #[test]
    fn physical_point_uses_direction_columns() {
        let g = Geometry { origin: [1.0, 2.0, 3.0], spacing: [2.0, 3.0, 4.0], direction: [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0] };
        // axis i (column 0) points along +y, axis j (column 1) along -x
        assert_eq!(g.index_to_physical([1.0, 0.0, 0.0]), [1.0, 4.0, 3.0]);
        assert_eq!(g.index_to_physical([0.0, 1.0, 0.0]), [-2.0, 2.0, 3.0]);
        g.validate().unwrap();
        let bad = Geometry { spacing: [1.0, 0.0, 1.0], ..g };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn labels_saturate_never_wrap() {
        assert_eq!(u8::from_f64(300.0), 255);
        assert_eq!(u8::from_f64(-4.0), 0);
        assert_eq!(u16::from_f64(f64::NAN), 0);
    }
}
