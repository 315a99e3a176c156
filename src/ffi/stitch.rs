//! Stitching on caller buffers: a volume's slices as tiles of one square canvas (DESIGN.md,
//! "Stitching") and back. Canvases are row-major `canvas × canvas`, row = j, column = i.
use super::view::{out_slice, read_view, voxel_count};
use super::boundary::{guard, sfr_status, FfiError, FfiResult};
use crate::stitch::{self, StitchLayout, IMAGE_PAD, LABEL_PAD};
use crate::volume::DType;
use ndarray::{ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

unsafe fn read_dims(dims: *const usize, what: &str) -> FfiResult<[usize; 3]> {
    if dims.is_null() {
        return Err(FfiError::null(what));
    }
    Ok([*dims, *dims.add(1), *dims.add(2)])
}

fn layout(dims: [usize; 3], canvas: usize) -> FfiResult<StitchLayout> {
    voxel_count(dims, "dims")?;
    Ok(StitchLayout::new(dims[1], dims[0], dims[2], canvas)?)
}

fn canvas_len(canvas: usize) -> FfiResult<usize> {
    canvas.checked_mul(canvas).ok_or_else(|| FfiError::invalid(format!("canvas {canvas} is too large")))
}

/// The grid a volume of `dims` (3 values: i, j, k = columns, rows, slices) gets on a
/// `canvas × canvas` image: `*n_row` rows and `*n_col` columns of tiles. Errors
/// (SFR_ERR_INVALID_ARGUMENT) when a slice is larger than the canvas or the slices do not all
/// fit (stitch a patch of fewer slices then). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_stitch_layout(dims: *const usize, canvas: usize, n_row: *mut usize, n_col: *mut usize) -> sfr_status {
    guard("sfr_stitch_layout", || {
        let dims = read_dims(dims, "dims")?;
        if n_row.is_null() || n_col.is_null() {
            return Err(FfiError::null(if n_row.is_null() { "n_row" } else { "n_col" }));
        }
        let l = layout(dims, canvas)?;
        *n_row = l.n_row;
        *n_col = l.n_col;
        Ok(())
    })
}

/// Stitches an image volume of any dtype into `out`, `canvas × canvas` floats (row-major),
/// converting voxels to float as they are (no normalisation) and padding with 0. `out_len` is in
/// elements and must be at least canvas*canvas. The view's geometry is checked but not used.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_stitch_image(volume: *const super::view::sfr_volume_view, canvas: usize, out: *mut f32, out_len: usize) -> sfr_status {
    guard("sfr_stitch_image", || {
        let v = read_view(volume, "volume")?;
        let l = layout(v.dims, canvas)?;
        let out = out_slice(out, out_len, canvas_len(canvas)?, "out", "floats")?;
        let data = v.to_vec::<f32>();
        let vol = ArrayView3::from_shape((v.dims[2], v.dims[1], v.dims[0]), &data).map_err(|e| FfiError::invalid(e.to_string()))?;
        let mut dst = ArrayViewMut2::from_shape((canvas, canvas), out).map_err(|e| FfiError::invalid(e.to_string()))?;
        stitch::stitch_into(&vol, &l, IMAGE_PAD, &mut dst)?;
        Ok(())
    })
}

/// Stitches a label volume (dtype must be SFR_DTYPE_U8) into `out`, `canvas × canvas` bytes,
/// padding with 255 (the value losses ignore). `out_len` in bytes ≥ canvas*canvas. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_stitch_labels(labels: *const super::view::sfr_volume_view, canvas: usize, out: *mut u8, out_len: usize) -> sfr_status {
    guard("sfr_stitch_labels", || {
        let v = read_view(labels, "labels")?;
        if v.dtype != DType::U8 {
            return Err(FfiError::invalid(format!("labels: dtype {} is not supported here (labels are SFR_DTYPE_U8)", v.dtype.name())));
        }
        let l = layout(v.dims, canvas)?;
        let out = out_slice(out, out_len, canvas_len(canvas)?, "out", "bytes")?;
        let vol = ArrayView3::from_shape((v.dims[2], v.dims[1], v.dims[0]), v.bytes).map_err(|e| FfiError::invalid(e.to_string()))?;
        let mut dst = ArrayViewMut2::from_shape((canvas, canvas), out).map_err(|e| FfiError::invalid(e.to_string()))?;
        stitch::stitch_into(&vol, &l, LABEL_PAD, &mut dst)?;
        Ok(())
    })
}

/// The inverse of `sfr_stitch_labels`: takes the labels of a `canvas × canvas` image
/// (`canvas_len` bytes, at least canvas*canvas) back to a volume of `dims` (3 values: i, j, k),
/// written x fastest into `out` (`out_len` bytes ≥ dims[0]*dims[1]*dims[2]). Padding is dropped.
/// The buffers must not overlap. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_unstitch_labels(
    canvas_data: *const u8,
    canvas_len: usize,
    canvas: usize,
    dims: *const usize,
    out: *mut u8,
    out_len: usize,
) -> sfr_status {
    guard("sfr_unstitch_labels", || {
        let dims = read_dims(dims, "dims")?;
        let l = layout(dims, canvas)?;
        let need_in = self::canvas_len(canvas)?;
        if canvas_data.is_null() {
            return Err(FfiError::null("canvas_data"));
        }
        if canvas_len < need_in {
            return Err(FfiError::invalid(format!("canvas_len is {canvas_len} bytes but a {canvas}×{canvas} canvas has {need_in}")));
        }
        let src = std::slice::from_raw_parts(canvas_data, need_in);
        let n = voxel_count(dims, "dims")?;
        let out = out_slice(out, out_len, n, "out", "bytes")?;
        let src = ArrayView2::from_shape((canvas, canvas), src).map_err(|e| FfiError::invalid(e.to_string()))?;
        let mut dst = ArrayViewMut3::from_shape((dims[2], dims[1], dims[0]), out).map_err(|e| FfiError::invalid(e.to_string()))?;
        stitch::unstitch_into(&src, &l, &mut dst)?;
        Ok(())
    })
}
