//! Volumes crossing the boundary: `sfr_volume_view`, the shape of an `itk::Image` buffer plus its
//! geometry, read into owned `Volume`s (inputs are always copied, so the caller may free its
//! buffer as soon as a call returns).
use super::boundary::{FfiError, FfiResult};
use crate::volume::{DType, Geometry, Volume, Voxel};
use ndarray::Array4;
use std::ffi::c_void;

/// Voxel types of a volume view. (The C enum is int-sized; fields and arguments declared
/// `sfr_dtype` are read as plain integers and checked, so an out-of-range value is an error,
/// not undefined behaviour.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum sfr_dtype {
    SFR_DTYPE_U8 = 0,
    SFR_DTYPE_I8 = 1,
    SFR_DTYPE_U16 = 2,
    SFR_DTYPE_I16 = 3,
    SFR_DTYPE_U32 = 4,
    SFR_DTYPE_I32 = 5,
    SFR_DTYPE_F32 = 6,
    SFR_DTYPE_F64 = 7,
}

/// How Rust receives an `sfr_dtype` (cbindgen renames it to `sfr_dtype` in the header).
pub type sfr_dtype_raw = std::ffi::c_int;

const _: () = assert!(std::mem::size_of::<sfr_dtype>() == std::mem::size_of::<sfr_dtype_raw>());

/// The `DType` of a raw `sfr_dtype` value.
pub fn dtype_from_raw(raw: sfr_dtype_raw, what: &str) -> FfiResult<DType> {
    Ok(match raw {
        0 => DType::U8,
        1 => DType::I8,
        2 => DType::U16,
        3 => DType::I16,
        4 => DType::U32,
        5 => DType::I32,
        6 => DType::F32,
        7 => DType::F64,
        other => return Err(FfiError::invalid(format!("{what}: unknown dtype {other} (expected SFR_DTYPE_U8 = 0 .. SFR_DTYPE_F64 = 7)"))),
    })
}

/// A volume as ITK holds it: voxels x fastest (i, then j, then k); `dims` in ITK `GetSize()`
/// order (i, j, k); LPS geometry with `direction` row-major 3×3 (column c = direction of axis c),
/// exactly `itk::Image::GetDirection()`.
///
/// What is copied: the library reads `data` only during the call that receives the view and
/// never writes it. Whatever it keeps or computes on is its own converted copy: images become
/// float32 (datasets, segmentation, stitching), labels uint8 after a check that every value
/// is a declared class index. So the caller may free or change its buffer as soon as the call
/// returns, and a volume costs 4 bytes per voxel (labels 1) inside the library whatever its
/// dtype.
///
/// From an `itk::Image` (whose buffer may be only part of the image: ExtractImageFilter
/// output, a streamed piece), describe the BUFFERED region:
/// `data = GetBufferPointer()`, `dims = GetBufferedRegion().GetSize()`,
/// `data_len = GetBufferedRegion().GetNumberOfPixels() * sizeof(pixel)`,
/// `origin = TransformIndexToPhysicalPoint(GetBufferedRegion().GetIndex())` (equal to
/// `GetOrigin()` only when that index is 0), `spacing = GetSpacing()`,
/// `direction = GetDirection()`. tests/cpp/itk_sfr_test.cxx (`view_of`) does exactly this.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sfr_volume_view {
    /// dims[0]*dims[1]*dims[2] elements of `dtype`, x fastest. Any alignment.
    pub data: *const c_void,
    /// Length of `data` in BYTES; must equal dims[0]*dims[1]*dims[2]*sizeof(dtype).
    pub data_len: usize,
    pub dtype: sfr_dtype_raw,
    /// Size along i, j, k (x, y, z); each at least 1.
    pub dims: [usize; 3],
    /// Voxel size in mm along i, j, k; positive and finite.
    pub spacing: [f64; 3],
    /// LPS position (mm) of the centre of the first voxel of `data` (for ITK: of the buffered
    /// region's first index, not `GetOrigin()` when that index is not 0).
    pub origin: [f64; 3],
    /// Row-major 3×3; columns are the (orthonormal) directions of the axes i, j, k.
    pub direction: [f64; 9],
}

/// A checked view: the caller's bytes, not yet copied.
pub struct ViewIn<'a> {
    pub dtype: DType,
    pub dims: [usize; 3],
    pub geometry: Geometry,
    pub bytes: &'a [u8],
}

/// Number of voxels of `dims` (each ≥ 1), overflow-checked.
pub fn voxel_count(dims: [usize; 3], what: &str) -> FfiResult<usize> {
    if dims.contains(&0) {
        return Err(FfiError::invalid(format!("{what}: dims {dims:?} has a zero size")));
    }
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| FfiError::invalid(format!("{what}: dims {dims:?} are too large")))
}

/// Reads and checks `*p` (NULL, dtype, dims, byte length, geometry).
pub unsafe fn read_view<'a>(p: *const sfr_volume_view, what: &str) -> FfiResult<ViewIn<'a>> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    let v = std::ptr::read_unaligned(p);
    let dtype = dtype_from_raw(v.dtype, what)?;
    let n = voxel_count(v.dims, what)?;
    let need = n * dtype.size();
    if v.data.is_null() {
        return Err(FfiError::null(&format!("{what}->data")));
    }
    if v.data_len != need {
        return Err(FfiError::invalid(format!(
            "{what}: data_len is {} bytes but dims {:?} of {} need {need} bytes ({n} voxels × {} bytes)",
            v.data_len,
            v.dims,
            dtype.name(),
            dtype.size()
        )));
    }
    let geometry = Geometry { origin: v.origin, spacing: v.spacing, direction: v.direction };
    geometry.validate().map_err(|e| FfiError::invalid(format!("{what}: {e}")))?;
    Ok(ViewIn { dtype, dims: v.dims, geometry, bytes: std::slice::from_raw_parts(v.data as *const u8, need) })
}

macro_rules! convert {
    ($bytes:expr, $src:ty, $dst:ty) => {{
        const S: usize = std::mem::size_of::<$src>();
        $bytes
            .chunks_exact(S)
            .map(|c| <$dst>::from_f64(<$src>::from_ne_bytes(c.try_into().expect("chunk of S bytes")).to_f64()))
            .collect::<Vec<$dst>>()
    }};
}

impl ViewIn<'_> {
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }

    /// The voxels converted to `T` (saturating, as `Voxel::from_f64`), x fastest.
    pub fn to_vec<T: Voxel>(&self) -> Vec<T> {
        if self.dtype == T::DTYPE {
            // Same type: a plain copy that also fixes any misalignment of the caller's buffer.
            let mut out = vec![T::default(); self.voxels()];
            unsafe { std::ptr::copy_nonoverlapping(self.bytes.as_ptr(), out.as_mut_ptr() as *mut u8, self.bytes.len()) };
            return out;
        }
        match self.dtype {
            DType::U8 => convert!(self.bytes, u8, T),
            DType::I8 => convert!(self.bytes, i8, T),
            DType::U16 => convert!(self.bytes, u16, T),
            DType::I16 => convert!(self.bytes, i16, T),
            DType::U32 => convert!(self.bytes, u32, T),
            DType::I32 => convert!(self.bytes, i32, T),
            DType::F32 => convert!(self.bytes, f32, T),
            DType::F64 => convert!(self.bytes, f64, T),
        }
    }

    /// An owned volume of `T` with the view's geometry.
    pub fn to_volume<T: Voxel>(&self) -> FfiResult<Volume<T>> {
        Ok(Volume::from_vec(self.dims, self.to_vec::<T>(), self.geometry)?)
    }
}

/// An output buffer of `len` elements that must hold `need`; NULL and short buffers are errors.
pub unsafe fn out_slice<'a, T>(p: *mut T, len: usize, need: usize, what: &str, unit: &str) -> FfiResult<&'a mut [T]> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    if len < need {
        return Err(FfiError::too_small(format!("{what} has {len} {unit}, needs {need}")));
    }
    Ok(std::slice::from_raw_parts_mut(p, need))
}

/// Writes u8 labels into a caller buffer of `dtype` U8 or U16 (`len` in bytes).
pub unsafe fn write_labels(labels: &[u8], dtype: sfr_dtype_raw, out: *mut c_void, len: usize, what: &str) -> FfiResult<()> {
    let (dt, bytes) = check_label_out(dtype, labels.len(), out, len, what)?;
    match dt {
        DType::U8 => std::ptr::copy_nonoverlapping(labels.as_ptr(), out as *mut u8, labels.len()),
        _ => {
            // u16 may be misaligned in a byte buffer: write bytes.
            let dst = std::slice::from_raw_parts_mut(out as *mut u8, bytes);
            for (d, &l) in dst.chunks_exact_mut(2).zip(labels) {
                d.copy_from_slice(&(l as u16).to_ne_bytes());
            }
        }
    }
    Ok(())
}

/// Checks a label output buffer (dtype U8/U16, non-NULL, long enough) without writing it.
pub fn check_label_out(dtype: sfr_dtype_raw, voxels: usize, out: *mut c_void, len: usize, what: &str) -> FfiResult<(DType, usize)> {
    let dt = dtype_from_raw(dtype, "label_dtype")?;
    if !matches!(dt, DType::U8 | DType::U16) {
        return Err(FfiError::invalid(format!("label_dtype {} is not supported for labels (use SFR_DTYPE_U8 or SFR_DTYPE_U16)", dt.name())));
    }
    if out.is_null() {
        return Err(FfiError::null(what));
    }
    let need = voxels * dt.size();
    if len < need {
        return Err(FfiError::too_small(format!("{what} has {len} bytes, needs {need} ({voxels} voxels × {} bytes of {})", dt.size(), dt.name())));
    }
    Ok((dt, need))
}

/// The output buffers of a segmentation (`sfr_segment`, `sfr_job_wait_segmentation`): labels
/// as `label_dtype` (U8 or U16, `labels_len` bytes) and, when `probabilities` is not NULL, the
/// class probabilities [c][k][j][i] (`probabilities_len` floats). One check and one writer for
/// both calls, so they cannot drift apart.
pub struct SegmentationBuffers {
    pub label_dtype: sfr_dtype_raw,
    pub labels: *mut c_void,
    pub labels_len: usize,
    pub probabilities: *mut f32,
    pub probabilities_len: usize,
}

impl SegmentationBuffers {
    /// Checks both buffers for `classes` × `voxels` without writing either: called before the
    /// work (fail fast, not after minutes of inference) and again by `write`.
    pub fn check(&self, classes: usize, voxels: usize) -> FfiResult<()> {
        check_label_out(self.label_dtype, voxels, self.labels, self.labels_len, "labels")?;
        if !self.probabilities.is_null() && self.probabilities_len < classes * voxels {
            return Err(FfiError::too_small(format!(
                "probabilities has {} floats, needs {} ({classes} classes × {voxels} voxels)",
                self.probabilities_len,
                classes * voxels
            )));
        }
        Ok(())
    }

    /// Writes the labels and, if asked for, the probabilities; both buffers are checked before
    /// either is written (outputs only on success).
    pub unsafe fn write(&self, labels: &Volume<u8>, probs: &Array4<f32>) -> FfiResult<()> {
        let lab = labels.data.as_slice().ok_or_else(|| FfiError::invalid("internal: labels not contiguous"))?;
        let classes = probs.shape()[0];
        if probs.len() != classes * lab.len() {
            return Err(FfiError::invalid(format!("internal: probabilities {:?} do not match {} voxels", probs.shape(), lab.len())));
        }
        self.check(classes, lab.len())?;
        write_labels(lab, self.label_dtype, self.labels, self.labels_len, "labels")?;
        if !self.probabilities.is_null() {
            let dst = std::slice::from_raw_parts_mut(self.probabilities, probs.len());
            match probs.as_slice() {
                Some(src) => dst.copy_from_slice(src),
                None => dst.iter_mut().zip(probs.iter()).for_each(|(d, s)| *d = *s),
            }
        }
        Ok(())
    }
}
