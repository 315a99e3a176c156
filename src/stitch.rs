//! Stitching: 3D volume/patch <-> 2D canvas (the paper's first module).
//!
//! A volume (or patch) of `nx × ny × nz` voxels, held as an ndarray `[nz, ny, nx]`, is `nz`
//! slices of `H = ny` rows by `W = nx` columns. They are laid out as tiles on an `S × S` canvas,
//! row-major, each slice shown as a viewer shows an axial slice (rows along j, columns along i):
//!
//! * `n_row = S div H`, `n_col = S div W`; each cell is `(S div n_row) × (S div n_col)`;
//! * a slice sits in its cell at `((cell_h - H) div 2, (cell_w - W) div 2)`;
//! * the grid of cells sits in the canvas at `((S - n_row·cell_h) div 2, (S - n_col·cell_w) div 2)`;
//! * with `m = n_row·n_col - nz` empty cells, `m div 2` padding slices come before the volume's
//!   slices and the rest after, so the volume is centred on the canvas;
//! * padding is 0 for images and 255 for labels (the loss ignores 255).
//!
//! Nothing is resampled, so the inverse (labels or class probabilities back to the volume) is
//! exact. A volume with more slices than cells is the caller's to split: [`StitchLayout::max_slices`]
//! and [`slab_ranges`] say how many fit.
use crate::error::{Error, Result};
use ndarray::{s, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// SAM ViT-B's input size.
pub const DEFAULT_CANVAS: usize = 1024;
/// Canvas value outside every slice, for images.
pub const IMAGE_PAD: f32 = 0.0;
/// Canvas value outside every slice, for labels: the loss's ignore index.
pub const LABEL_PAD: u8 = 255;

/// Where each slice of an `h × w × d` volume lands on an `canvas × canvas` image.
/// All offsets are in canvas pixels; `(row, column)` order throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StitchLayout {
    /// Side S of the square canvas.
    pub canvas: usize,
    /// Rows of a slice (ny).
    pub h: usize,
    /// Columns of a slice (nx).
    pub w: usize,
    /// Number of volume slices stitched (nz).
    pub d: usize,
    pub n_row: usize,
    pub n_col: usize,
    pub cell_h: usize,
    pub cell_w: usize,
    /// Offset of the grid of cells in the canvas.
    pub off_h: usize,
    pub off_w: usize,
    /// Offset of a slice inside its cell.
    pub tile_off_h: usize,
    pub tile_off_w: usize,
    /// Padding slices before the volume's first slice (`(n_row·n_col - d) div 2`).
    pub pad_before: usize,
}

fn check_slice_fits(h: usize, w: usize, canvas: usize) -> Result<()> {
    if canvas == 0 {
        return Err(Error::invalid("stitch: canvas size must be positive"));
    }
    if canvas.checked_mul(canvas).is_none_or(|n| n > isize::MAX as usize / 8) {
        return Err(Error::invalid(format!("stitch: canvas size {canvas} is too large")));
    }
    if h == 0 || w == 0 {
        return Err(Error::invalid(format!("stitch: slice of {h}×{w} pixels is empty")));
    }
    if h > canvas || w > canvas {
        return Err(Error::invalid(format!(
            "stitch: a slice of {h} rows × {w} columns does not fit a {canvas}×{canvas} canvas \
             (stitching never resamples: crop the volume or use a larger canvas)"
        )));
    }
    Ok(())
}

impl StitchLayout {
    /// Layout for `d` slices of `h` rows (ny) by `w` columns (nx) on a `canvas × canvas` image.
    /// Errors when a slice is larger than the canvas or when `d` exceeds
    /// [`max_slices`](Self::max_slices): the caller then stitches a patch of fewer slices.
    pub fn new(h: usize, w: usize, d: usize, canvas: usize) -> Result<Self> {
        let max = Self::max_slices(h, w, canvas)?;
        if d == 0 {
            return Err(Error::invalid("stitch: the volume has no slices"));
        }
        if d > max {
            return Err(Error::invalid(format!(
                "stitch: {d} slices of {h}×{w} do not fit a {canvas}×{canvas} canvas, which holds at most {max}; \
                 stitch a patch of at most {max} slices"
            )));
        }
        let n_row = canvas / h;
        let n_col = canvas / w;
        let cell_h = canvas / n_row;
        let cell_w = canvas / n_col;
        Ok(StitchLayout {
            canvas,
            h,
            w,
            d,
            n_row,
            n_col,
            cell_h,
            cell_w,
            off_h: (canvas - n_row * cell_h) / 2,
            off_w: (canvas - n_col * cell_w) / 2,
            tile_off_h: (cell_h - h) / 2,
            tile_off_w: (cell_w - w) / 2,
            pad_before: (n_row * n_col - d) / 2,
        })
    }

    /// Layout for an ndarray of shape `[nz, ny, nx]` (a `Volume`'s `data.shape()`).
    pub fn for_shape(shape: &[usize], canvas: usize) -> Result<Self> {
        match *shape {
            [d, h, w] => Self::new(h, w, d, canvas),
            _ => Err(Error::invalid(format!("stitch: expected a 3D shape [nz, ny, nx], got {shape:?}"))),
        }
    }

    /// How many slices of `h × w` fit one canvas (`n_row · n_col`).
    pub fn max_slices(h: usize, w: usize, canvas: usize) -> Result<usize> {
        check_slice_fits(h, w, canvas)?;
        Ok((canvas / h) * (canvas / w))
    }

    /// The ndarray shape `[d, h, w]` of the volume this layout stitches.
    pub fn volume_shape(&self) -> [usize; 3] {
        [self.d, self.h, self.w]
    }

    /// Grid cell `(row, column)` holding volume slice `k`, or `None` when `k >= d`.
    pub fn tile_of(&self, k: usize) -> Option<(usize, usize)> {
        (k < self.d).then(|| {
            let p = k + self.pad_before;
            (p / self.n_col, p % self.n_col)
        })
    }

    /// Canvas pixel `(row, column)` of the top-left voxel of volume slice `k`.
    pub fn slice_origin(&self, k: usize) -> Option<(usize, usize)> {
        self.tile_of(k).map(|(r, c)| {
            (self.off_h + r * self.cell_h + self.tile_off_h, self.off_w + c * self.cell_w + self.tile_off_w)
        })
    }

    /// For canvas row `r`: which slice row `j` it shows and which grid row it is in, or `None`
    /// when the whole canvas row is padding.
    fn canvas_row(&self, r: usize) -> Option<(usize, usize)> {
        let gr = r.checked_sub(self.off_h)?;
        if gr >= self.n_row * self.cell_h {
            return None;
        }
        let j = (gr % self.cell_h).checked_sub(self.tile_off_h)?;
        (j < self.h).then_some((j, gr / self.cell_h))
    }

    /// Volume slice shown in grid cell `(grid_row, col)`, if any.
    fn slice_in_cell(&self, grid_row: usize, col: usize) -> Option<usize> {
        let k = (grid_row * self.n_col + col).checked_sub(self.pad_before)?;
        (k < self.d).then_some(k)
    }

    fn check_volume(&self, shape: &[usize]) -> Result<()> {
        if shape != self.volume_shape() {
            return Err(Error::invalid(format!(
                "stitch: volume of shape {shape:?} does not match the layout's [d, h, w] = {:?}",
                self.volume_shape()
            )));
        }
        Ok(())
    }

    fn check_canvas(&self, shape: &[usize]) -> Result<()> {
        if shape != [self.canvas, self.canvas] {
            return Err(Error::invalid(format!(
                "stitch: canvas of shape {shape:?} does not match the layout's {0}×{0}",
                self.canvas
            )));
        }
        Ok(())
    }
}

/// Splits `nz` slices into the fewest consecutive ranges that each fit a canvas, of near-equal
/// length (they differ by at most one slice), e.g. for pseudo-labelling a whole volume.
pub fn slab_ranges(nz: usize, h: usize, w: usize, canvas: usize) -> Result<Vec<Range<usize>>> {
    let max = StitchLayout::max_slices(h, w, canvas)?;
    if nz == 0 {
        return Err(Error::invalid("stitch: the volume has no slices"));
    }
    let n = nz.div_ceil(max);
    let (base, extra) = (nz / n, nz % n);
    let mut start = 0;
    Ok((0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

/// Rows of a volume, read through the fastest path its memory layout allows.
enum Rows<'a, T> {
    Contiguous { data: &'a [T], h: usize, w: usize },
    Strided(ArrayView3<'a, T>),
}

impl<'a, T: Copy> Rows<'a, T> {
    fn new(v: &ArrayView3<'a, T>) -> Self {
        match v.to_slice() {
            Some(data) => Rows::Contiguous { data, h: v.shape()[1], w: v.shape()[2] },
            None => Rows::Strided(*v),
        }
    }

    fn copy_row(&self, k: usize, j: usize, dst: &mut [T]) {
        match self {
            Rows::Contiguous { data, h, w } => dst.copy_from_slice(&data[(k * h + j) * w..][..*w]),
            Rows::Strided(v) => copy_view(v.slice(s![k, j, ..]), dst),
        }
    }
}

fn copy_view<T: Copy>(src: ArrayView1<T>, dst: &mut [T]) {
    match src.as_slice() {
        Some(s) => dst.copy_from_slice(s),
        None => dst.iter_mut().zip(src.iter()).for_each(|(d, s)| *d = *s),
    }
}

/// Writes canvas row `r`. With `write_pad` false the row is assumed to hold `pad` already.
fn fill_canvas_row<T: Copy>(layout: &StitchLayout, rows: &Rows<T>, pad: T, write_pad: bool, r: usize, dst: &mut [T]) {
    let Some((j, gr)) = layout.canvas_row(r) else {
        if write_pad {
            dst.fill(pad);
        }
        return;
    };
    let mut cursor = 0;
    for c in 0..layout.n_col {
        let Some(k) = layout.slice_in_cell(gr, c) else { continue };
        let c0 = layout.off_w + c * layout.cell_w + layout.tile_off_w;
        if write_pad {
            dst[cursor..c0].fill(pad);
        }
        rows.copy_row(k, j, &mut dst[c0..c0 + layout.w]);
        cursor = c0 + layout.w;
    }
    if write_pad {
        dst[cursor..].fill(pad);
    }
}

/// Canvas rows per rayon task: enough work per task to hide the scheduling cost.
const ROWS_PER_TASK: usize = 16;

fn stitch_rows<T: Copy + Send + Sync>(
    volume: &ArrayView3<T>,
    layout: &StitchLayout,
    pad: T,
    write_pad: bool,
    canvas: &mut ArrayViewMut2<T>,
) {
    let rows = Rows::new(volume);
    let s = layout.canvas;
    match canvas.as_slice_mut() {
        Some(flat) => flat
            .par_chunks_mut(s)
            .with_min_len(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(r, dst)| fill_canvas_row(layout, &rows, pad, write_pad, r, dst)),
        None => canvas.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(r, mut row)| {
            let mut tmp = vec![pad; s];
            fill_canvas_row(layout, &rows, pad, true, r, &mut tmp);
            row.assign(&ArrayView1::from(&tmp[..]));
        }),
    }
}

/// Stitches `volume` (`[d, h, w]`) into the existing `canvas` (`[S, S]`), overwriting every
/// pixel: slices where the layout puts them, `pad` elsewhere.
pub fn stitch_into<T: Copy + Send + Sync>(
    volume: &ArrayView3<T>,
    layout: &StitchLayout,
    pad: T,
    canvas: &mut ArrayViewMut2<T>,
) -> Result<()> {
    layout.check_volume(volume.shape())?;
    layout.check_canvas(canvas.shape())?;
    stitch_rows(volume, layout, pad, true, canvas);
    Ok(())
}

/// Stitches `volume` (`[d, h, w]`) into a new `S × S` canvas padded with `pad`.
pub fn stitch<T: Copy + Send + Sync>(volume: &ArrayView3<T>, layout: &StitchLayout, pad: T) -> Result<Array2<T>> {
    layout.check_volume(volume.shape())?;
    // Filling first lets the allocator hand out zeroed pages for pad 0 and leaves only the
    // slices to copy.
    let mut canvas = Array2::from_elem((layout.canvas, layout.canvas), pad);
    stitch_rows(volume, layout, pad, false, &mut canvas.view_mut());
    Ok(canvas)
}

/// An image volume on a canvas, padded with 0.
pub fn stitch_image(volume: &ArrayView3<f32>, layout: &StitchLayout) -> Result<Array2<f32>> {
    stitch(volume, layout, IMAGE_PAD)
}

/// A label volume on a canvas, padded with 255 (ignored by the loss).
pub fn stitch_labels(volume: &ArrayView3<u8>, layout: &StitchLayout) -> Result<Array2<u8>> {
    stitch(volume, layout, LABEL_PAD)
}

/// Copies the slices of `canvas` (`[S, S]`) back into `out` (`[d, h, w]`); padding is dropped.
pub fn unstitch_into<T: Copy + Send + Sync>(
    canvas: &ArrayView2<T>,
    layout: &StitchLayout,
    out: &mut ArrayViewMut3<T>,
) -> Result<()> {
    layout.check_canvas(canvas.shape())?;
    layout.check_volume(out.shape())?;
    let flat = canvas.to_slice();
    let (s, w) = (layout.canvas, layout.w);
    let src_row = |r: usize, c0: usize, dst: &mut [T]| match flat {
        Some(f) => dst.copy_from_slice(&f[r * s + c0..][..w]),
        None => copy_view(canvas.slice(s![r, c0..c0 + w]), dst),
    };
    out.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(k, mut slice)| {
        let (r0, c0) = layout.slice_origin(k).expect("k < d by construction");
        match slice.as_slice_mut() {
            Some(dst) => dst.chunks_mut(w).enumerate().for_each(|(j, row)| src_row(r0 + j, c0, row)),
            None => {
                let mut tmp = Vec::with_capacity(w);
                for (j, mut row) in slice.axis_iter_mut(Axis(0)).enumerate() {
                    tmp.clear();
                    tmp.extend(canvas.slice(s![r0 + j, c0..c0 + w]).iter().copied());
                    row.assign(&ArrayView1::from(&tmp[..]));
                }
            }
        }
    });
    Ok(())
}

/// The volume (`[d, h, w]`) that `canvas` shows; exact inverse of [`stitch`].
pub fn unstitch<T: Copy + Default + Send + Sync>(canvas: &ArrayView2<T>, layout: &StitchLayout) -> Result<Array3<T>> {
    let mut out = Array3::from_elem((layout.d, layout.h, layout.w), T::default());
    unstitch_into(canvas, layout, &mut out.view_mut())?;
    Ok(out)
}

/// Labels predicted on a canvas, back to the volume's `[d, h, w]`.
pub fn unstitch_labels(canvas: &ArrayView2<u8>, layout: &StitchLayout) -> Result<Array3<u8>> {
    unstitch(canvas, layout)
}

/// Per-class maps on a canvas (`[C, S, S]`, e.g. softmax probabilities) back to
/// `[C, d, h, w]`.
pub fn unstitch_probabilities(probs: &ArrayView3<f32>, layout: &StitchLayout) -> Result<Array4<f32>> {
    let c = probs.shape()[0];
    layout.check_canvas(&probs.shape()[1..]).map_err(|_| {
        Error::invalid(format!(
            "unstitch: probability maps of shape {:?} are not [C, {1}, {1}]",
            probs.shape(),
            layout.canvas
        ))
    })?;
    let mut out = Array4::<f32>::zeros((c, layout.d, layout.h, layout.w));
    for (map, mut vol) in probs.outer_iter().zip(out.outer_iter_mut()) {
        unstitch_into(&map, layout, &mut vol)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    fn ramp(d: usize, h: usize, w: usize) -> Array3<f32> {
        Array::from_shape_fn((d, h, w), |(k, j, i)| (k * 10_000 + j * 100 + i) as f32 + 1.0)
    }

    #[test]
    fn la_patch_gives_nine_by_nine() {
        let l = StitchLayout::new(112, 112, 80, 1024).unwrap();
        assert_eq!((l.n_row, l.n_col, l.cell_h, l.cell_w), (9, 9, 113, 113));
        // 1024 - 9·113 = 7 spare pixels: 3 before the grid.
        assert_eq!((l.off_h, l.off_w, l.tile_off_h, l.tile_off_w), (3, 3, 0, 0));
        // 81 cells for 80 slices: the one missing slice goes after (1 div 2 = 0 before).
        assert_eq!(l.pad_before, 0);
        assert_eq!(l.slice_origin(0), Some((3, 3)));
        assert_eq!(l.slice_origin(79), Some((3 + 8 * 113, 3 + 7 * 113)));
        assert_eq!(l.slice_origin(80), None);
    }

    #[test]
    fn btcv_96_gives_ten_by_ten() {
        let l = StitchLayout::for_shape(&[96, 96, 96], 1024).unwrap();
        assert_eq!((l.n_row, l.n_col, l.cell_h, l.cell_w), (10, 10, 102, 102));
        assert_eq!((l.off_h, l.off_w, l.tile_off_h, l.tile_off_w), (2, 2, 3, 3));
        // 4 missing slices: 2 before, 2 after.
        assert_eq!(l.pad_before, 2);
        assert_eq!(l.tile_of(0), Some((0, 2)));
        assert_eq!(l.tile_of(95), Some((9, 7)));
        assert_eq!(l.slice_origin(0), Some((2 + 3, 2 + 2 * 102 + 3)));
    }

    #[test]
    fn offsets_follow_the_formula_for_non_square_slices() {
        // 50 rows × 30 columns on 128: n_row 2, n_col 4, cells 64×32.
        let l = StitchLayout::new(50, 30, 5, 128).unwrap();
        assert_eq!((l.n_row, l.n_col, l.cell_h, l.cell_w), (2, 4, 64, 32));
        assert_eq!((l.off_h, l.off_w), (0, 0));
        assert_eq!((l.tile_off_h, l.tile_off_w), (7, 1));
        assert_eq!(l.pad_before, 1); // m = 3
        assert_eq!(l.slice_origin(0), Some((7, 32 + 1)));
        assert_eq!(l.slice_origin(3), Some((64 + 7, 1)));
        // 100 columns: n_col = 1, cell 100, no spare pixel inside the cell.
        let l = StitchLayout::new(7, 100, 3, 100).unwrap();
        assert_eq!((l.n_row, l.n_col, l.cell_h, l.cell_w, l.off_h, l.tile_off_h), (14, 1, 7, 100, 1, 0));
        assert_eq!(l.pad_before, 5);
    }

    #[test]
    fn errors_are_clear() {
        let e = StitchLayout::new(112, 112, 82, 1024).unwrap_err().to_string();
        assert!(e.contains("82 slices") && e.contains("at most 81"), "{e}");
        let e = StitchLayout::new(1025, 10, 1, 1024).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(StitchLayout::new(0, 10, 1, 64).is_err());
        assert!(StitchLayout::new(10, 10, 0, 64).is_err());
        assert!(StitchLayout::new(10, 10, 1, 0).is_err());
        assert!(StitchLayout::new(1, 1, 1, usize::MAX).is_err());
        assert!(StitchLayout::for_shape(&[3, 4], 64).is_err());
        assert_eq!(StitchLayout::max_slices(112, 112, 1024).unwrap(), 81);
        assert_eq!(StitchLayout::max_slices(512, 512, 1024).unwrap(), 4);

        let l = StitchLayout::new(4, 4, 2, 16).unwrap();
        let wrong = Array3::<f32>::zeros((3, 4, 4));
        assert!(stitch_image(&wrong.view(), &l).is_err());
        let wrong_canvas = Array2::<u8>::zeros((16, 15));
        assert!(unstitch_labels(&wrong_canvas.view(), &l).is_err());
        let wrong_probs = Array3::<f32>::zeros((2, 15, 16));
        let e = unstitch_probabilities(&wrong_probs.view(), &l).unwrap_err().to_string();
        assert!(e.contains("[C, 16, 16]"), "{e}");
    }

    #[test]
    fn stitch_places_slices_and_pads() {
        let l = StitchLayout::new(3, 2, 3, 8).unwrap(); // n_row 2, n_col 4, pad_before 2
        let v = ramp(3, 3, 2);
        let c = stitch_image(&v.view(), &l).unwrap();
        let mut expect = Array2::<f32>::zeros((8, 8));
        for k in 0..3 {
            let (r0, c0) = l.slice_origin(k).unwrap();
            expect.slice_mut(s![r0..r0 + 3, c0..c0 + 2]).assign(&v.index_axis(Axis(0), k));
        }
        assert_eq!(c, expect);
        assert_eq!(l.tile_of(0), Some((0, 2)));
        assert_eq!(unstitch(&c.view(), &l).unwrap(), v);
    }

    #[test]
    fn into_variants_overwrite_everything_and_accept_strided_views() {
        let l = StitchLayout::new(5, 4, 7, 16).unwrap();
        let big = ramp(9, 7, 6);
        // A cropped, non-contiguous view of a larger volume.
        let v = big.slice(s![1..8, 1..6, 2..6]);
        assert!(v.as_slice().is_none());
        let mut canvas = Array2::<f32>::from_elem((16, 16), -7.0);
        stitch_into(&v, &l, 0.0, &mut canvas.view_mut()).unwrap();
        assert_eq!(canvas, stitch_image(&v.to_owned().view(), &l).unwrap());
        // A transposed (column-major) canvas takes the fallback path.
        let mut t = Array2::<f32>::from_elem((16, 16), -7.0);
        let mut tv = t.view_mut().reversed_axes();
        stitch_into(&v, &l, 0.0, &mut tv).unwrap();
        assert_eq!(tv, canvas);
        let mut out = Array3::<f32>::zeros((7, 5, 4));
        unstitch_into(&tv.view(), &l, &mut out.view_mut()).unwrap();
        assert_eq!(out, v);
        // A strided output volume.
        let mut out_big = Array3::<f32>::zeros((7, 5, 8));
        unstitch_into(&canvas.view(), &l, &mut out_big.slice_mut(s![.., .., ..;2])).unwrap();
        assert_eq!(out_big.slice(s![.., .., ..;2]), v);
    }

    #[test]
    fn probabilities_round_trip() {
        let l = StitchLayout::new(6, 5, 4, 20).unwrap();
        let p = Array::from_shape_fn((3, 4, 6, 5), |(c, k, j, i)| (c * 1000 + k * 100 + j * 10 + i) as f32);
        let mut maps = Array3::<f32>::zeros((3, 20, 20));
        for c in 0..3 {
            maps.index_axis_mut(Axis(0), c).assign(&stitch_image(&p.index_axis(Axis(0), c), &l).unwrap());
        }
        assert_eq!(unstitch_probabilities(&maps.view(), &l).unwrap(), p);
    }

    #[test]
    fn slabs_cover_the_volume_evenly() {
        assert_eq!(slab_ranges(300, 512, 512, 1024).unwrap().len(), 75);
        let r = slab_ranges(10, 4, 4, 8).unwrap(); // 4 per canvas -> 3 slabs of 4,3,3
        assert_eq!(r, vec![0..4, 4..7, 7..10]);
        assert_eq!(slab_ranges(4, 4, 4, 8).unwrap(), vec![0..4]);
        assert!(slab_ranges(0, 4, 4, 8).is_err());
        assert!(slab_ranges(3, 9, 4, 8).is_err());
    }
}
