//! PNG output of stitched canvases, for people to look at.
//!
//! The image is windowed to 8-bit grey; a label canvas, when given, is blended over it with a
//! fixed colour per class. This is a picture, not data: use NIfTI to keep values.
use crate::error::{Error, Result};
use crate::io::text::{with_titles, Titles};
use crate::volume::Geometry;
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};
use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Colour of class c (c ≥ 1) is `CLASS_COLOURS[(c - 1) % len]`: a palette of distinct colours
/// (Trubetskoy's "20 simple distinct colours", most distinct first). Class 0 (background) and the
/// label padding 255 are not coloured.
pub const CLASS_COLOURS: [[u8; 3]; 16] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [220, 190, 255],
    [170, 110, 40],
    [255, 250, 200],
    [128, 0, 0],
    [170, 255, 195],
];

/// Weight of the class colour in the overlay (the grey image keeps the rest).
pub const OVERLAY_ALPHA: f32 = 0.5;

/// Lower and upper percentiles of the grey window.
const WINDOW_PERCENTILES: (f64, f64) = (0.005, 0.995);

/// The grey window `(lo, hi)`: the 0.5th and 99.5th percentiles of the canvas's content pixels
/// (finite, not exactly 0 — the image padding value, and the background of most MR scans — and,
/// when a label canvas is given, not labelled 255). Values at or below `lo` show black, at or
/// above `hi` white. When no pixel qualifies every finite pixel is used; a flat image gets a
/// window of width 1 centred on its value, so it shows mid-grey.
pub fn intensity_window(image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>) -> (f32, f32) {
    let content = |x: f32, l: u8| x.is_finite() && x != 0.0 && l != crate::stitch::LABEL_PAD;
    let mut v: Vec<f32> = match label {
        Some(lab) => image.iter().zip(lab.iter()).filter(|&(&x, &l)| content(x, l)).map(|(&x, _)| x).collect(),
        None => image.iter().copied().filter(|&x| content(x, 0)).collect(),
    };
    if v.is_empty() {
        v = image.iter().copied().filter(|x| x.is_finite()).collect();
    }
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let (lo, hi) = crate::volume::quantile_pair(&mut v, WINDOW_PERCENTILES).expect("not empty");
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

fn grey(x: f32, lo: f32, hi: f32) -> u8 {
    if !x.is_finite() {
        return 0;
    }
    (((x - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Pixels of the picture, row-major: grey (1 byte per pixel) or RGB (3) with a label overlay.
fn render(image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>) -> Vec<u8> {
    let (lo, hi) = intensity_window(image, label);
    match label {
        None => image.iter().map(|&x| grey(x, lo, hi)).collect(),
        Some(lab) => {
            let mut out = Vec::with_capacity(image.len() * 3);
            for (&x, &l) in image.iter().zip(lab.iter()) {
                let g = grey(x, lo, hi);
                if l == 0 || l == crate::stitch::LABEL_PAD {
                    out.extend_from_slice(&[g; 3]);
                } else {
                    let c = CLASS_COLOURS[(l as usize - 1) % CLASS_COLOURS.len()];
                    let blend = |c: u8| ((1.0 - OVERLAY_ALPHA) * g as f32 + OVERLAY_ALPHA * c as f32).round() as u8;
                    out.extend_from_slice(&[blend(c[0]), blend(c[1]), blend(c[2])]);
                }
            }
            out
        }
    }
}

/// Removes the temporary file unless the write went through.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Checks that `image` and `label` can make a PNG at `path`; returns its size.
fn check_canvas(path: &Path, image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>) -> Result<(u32, u32)> {
    let (h, w) = image.dim();
    if h == 0 || w == 0 {
        return Err(Error::format(path, format!("cannot write an empty {h}×{w} image as PNG")));
    }
    let (Ok(hu), Ok(wu)) = (u32::try_from(h), u32::try_from(w)) else {
        return Err(Error::format(path, format!("{h}×{w} is too large for a PNG")));
    };
    if let Some(lab) = label {
        if lab.dim() != (h, w) {
            return Err(Error::invalid(format!(
                "{}: label canvas {:?} does not match the image canvas {:?}",
                path.display(),
                lab.dim(),
                (h, w)
            )));
        }
    }
    if path.file_name().is_none() {
        return Err(Error::format(path, "not a file path"));
    }
    Ok((hu, wu))
}

/// Writes 8-bit `pixels` (row-major, `colour`'s channels) of `width` × `height` as a PNG at
/// `path`: beside it under a temporary name, then renamed into place, so a failure never leaves
/// a partial PNG at `path`.
fn write_pixels(path: &Path, width: u32, height: u32, colour: png::ColorType, pixels: &[u8]) -> Result<()> {
    let mut tmp = TempFile { path: crate::io::temp_sibling(path, ".tmp"), keep: false };
    let file = File::create(&tmp.path).map_err(|e| Error::io(&tmp.path, e))?;
    let enc_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => Error::io(path, e),
        e => Error::format(path, format!("PNG encoding failed: {e}")),
    };
    let mut enc = png::Encoder::new(BufWriter::new(&file), width, height);
    enc.set_color(colour);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(enc_err)?;
    writer.write_image_data(pixels).map_err(enc_err)?;
    // `finish` flushes the buffer and reports its errors; syncing makes the rename publish a
    // complete file even across a crash.
    writer.finish().map_err(enc_err)?;
    file.sync_all().map_err(|e| Error::io(&tmp.path, e))?;
    std::fs::rename(&tmp.path, path).map_err(|e| Error::io(path, e))?;
    tmp.keep = true;
    Ok(())
}

/// Writes `image` (a canvas, row = PNG row) as an 8-bit grey PNG, or as RGB with `label`
/// blended over it in [`CLASS_COLOURS`]. The file is written beside `path` under a temporary
/// name and renamed into place, so a failure never leaves a partial PNG at `path`.
pub fn write_canvas_png(path: impl AsRef<Path>, image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>) -> Result<()> {
    let path = path.as_ref();
    let (h, w) = check_canvas(path, image, label)?;
    let colour = if label.is_some() { png::ColorType::Rgb } else { png::ColorType::Grayscale };
    write_pixels(path, w, h, colour, &render(image, label))
}

/// As [`write_canvas_png`], always in RGB, with `titles` drawn on dark bands above and to the
/// left of the canvas ([`crate::io::text::with_titles`]). The bands take no part in the grey
/// window: the canvas's pixels are those [`write_canvas_png`] writes.
pub fn write_titled_png(path: impl AsRef<Path>, image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>, titles: &Titles) -> Result<()> {
    let path = path.as_ref();
    check_canvas(path, image, label)?;
    let mut pixels = render(image, label);
    if label.is_none() {
        pixels = pixels.iter().flat_map(|&g| [g; 3]).collect();
    }
    let canvas = Array3::from_shape_vec((image.nrows(), image.ncols(), 3), pixels).expect("3 bytes per pixel");
    let out = with_titles(&canvas.view(), titles);
    let (h, w, _) = out.dim();
    let (Ok(hu), Ok(wu)) = (u32::try_from(h), u32::try_from(w)) else {
        return Err(Error::format(path, format!("{h}×{w} is too large for a PNG")));
    };
    write_pixels(path, wu, hu, png::ColorType::Rgb, out.as_standard_layout().as_slice().expect("standard layout"))
}

/// The three planes of a viewer's slice views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Axial,
    Coronal,
    Sagittal,
}

impl View {
    pub const ALL: [View; 3] = [View::Axial, View::Coronal, View::Sagittal];

    pub fn name(self) -> &'static str {
        match self {
            View::Axial => "axial",
            View::Coronal => "coronal",
            View::Sagittal => "sagittal",
        }
    }

    /// `(normal, down, right)` of the view as (LPS axis, sign): 3D Slicer's default slice views
    /// (radiological convention). Axial: patient right on the screen's left, anterior up;
    /// coronal: right on the left, superior up; sagittal: anterior on the left, superior up.
    /// Normals point to superior, posterior, left (slices are ordered along them).
    fn screen_axes(self) -> [(usize, f64); 3] {
        match self {
            View::Axial => [(2, 1.0), (1, 1.0), (0, 1.0)],
            View::Coronal => [(1, 1.0), (2, -1.0), (0, 1.0)],
            View::Sagittal => [(0, 1.0), (2, -1.0), (1, 1.0)],
        }
    }
}

/// For each LPS axis, the voxel axis (0 = i, 1 = j, 2 = k) closest to it: the permutation that
/// maximises the summed |cosines| (so an oblique volume still maps each axis once, as a viewer's
/// "closest plane" does).
fn closest_voxel_axes(g: &Geometry) -> [usize; 3] {
    const PERMS: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    let score = |p: &[usize; 3]| (0..3).map(|a| g.direction[3 * a + p[a]].abs()).sum::<f64>();
    *PERMS.iter().max_by(|a, b| score(a).total_cmp(&score(b))).expect("six permutations")
}

/// `volume` (ndarray `[k, j, i]`) re-ordered for a view: axis 0 runs along the view's normal,
/// axis 1 down the screen, axis 2 to the right, so that `result.index_axis(Axis(0), n)` is a
/// slice as a viewer shows it (nearest plane, no resampling). Also returns the spacing (mm) of
/// the three result axes. Only axes are permuted and flipped: the voxels are the volume's own.
pub fn oriented<T: Clone>(volume: &ArrayView3<T>, geometry: &Geometry, view: View) -> (Array3<T>, [f64; 3]) {
    let voxel_of_lps = closest_voxel_axes(geometry);
    let mut axes = [0usize; 3];
    let mut flip = [false; 3];
    let mut spacing = [0f64; 3];
    for (n, (lps, sign)) in view.screen_axes().into_iter().enumerate() {
        let c = voxel_of_lps[lps];
        axes[n] = 2 - c; // voxel axis c (i, j, k) is ndarray axis 2 - c
        flip[n] = geometry.direction[3 * lps + c] * sign < 0.0;
        spacing[n] = geometry.spacing[c];
    }
    let mut v = volume.view().permuted_axes(axes);
    for (n, &f) in flip.iter().enumerate() {
        if f {
            v.invert_axis(Axis(n));
        }
    }
    (v.as_standard_layout().into_owned(), spacing)
}

/// Nearest-neighbour enlargement by whole factors (rows, columns), for pictures of small slices.
pub fn enlarge<T: Clone>(a: &ArrayView2<T>, rows: usize, cols: usize) -> Array2<T> {
    let (rows, cols) = (rows.max(1), cols.max(1));
    Array2::from_shape_fn((a.nrows() * rows, a.ncols() * cols), |(r, c)| a[[r / rows, c / cols]].clone())
}

/// Where [`tile_grid`] puts its cells: the pixel rows of each row of cells and the pixel columns
/// of each column of cells, for the same `tiles` and `gap`.
pub fn grid_cells<T>(tiles: &[Vec<Array2<T>>], gap: usize) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let n_cols = tiles.iter().map(Vec::len).max().unwrap_or(0);
    let row_h = tiles.iter().map(|r| r.iter().map(|t| t.nrows()).max().unwrap_or(0));
    let col_w = (0..n_cols).map(|c| tiles.iter().filter_map(|r| r.get(c)).map(|t| t.ncols()).max().unwrap_or(0));
    // Each cell starts `gap` after the previous one ends (or after the edge).
    let spans = |sizes: Vec<usize>| {
        sizes
            .into_iter()
            .scan(gap, |at, n| {
                let r = *at..*at + n;
                *at += n + gap;
                Some(r)
            })
            .collect::<Vec<_>>()
    };
    (spans(row_h.collect()), spans(col_w.collect()))
}

/// Tiles laid out as a grid (`tiles[row][column]`), each centred in its cell, cells as large as
/// the largest tile of their row and column, `gap` pixels of `pad` between and around them.
/// Rows may have different lengths.
pub fn tile_grid<T: Clone>(tiles: &[Vec<Array2<T>>], gap: usize, pad: T) -> Array2<T> {
    let (rows, cols) = grid_cells(tiles, gap);
    let h = rows.last().map_or(0, |r| r.end) + gap;
    let w = cols.last().map_or(0, |c| c.end) + gap;
    let mut out = Array2::from_elem((h, w), pad);
    for (row, rr) in tiles.iter().zip(&rows) {
        for (t, cc) in row.iter().zip(&cols) {
            let (ty, tx) = (rr.start + (rr.len() - t.nrows()) / 2, cc.start + (cc.len() - t.ncols()) / 2);
            out.slice_mut(s![ty..ty + t.nrows(), tx..tx + t.ncols()]).assign(t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(File::open(path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn no_temp_files(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"))
    }

    #[test]
    fn grey_png_round_trips_with_a_robust_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        // Padding 0 around a ramp 1..=1000 plus one huge outlier the window must ignore.
        let mut img = Array2::<f32>::zeros((40, 50));
        for (n, x) in img.slice_mut(ndarray::s![5..25, ..]).iter_mut().enumerate() {
            *x = (n + 1) as f32;
        }
        img[[30, 0]] = 1e9;
        img[[31, 0]] = f32::NAN;
        write_canvas_png(&path, &img.view(), None).unwrap();
        let (info, px) = decode(&path);
        assert_eq!((info.width, info.height, info.color_type), (50, 40, png::ColorType::Grayscale));
        assert_eq!(px.len(), 2000);
        let at = |r: usize, c: usize| px[r * 50 + c];
        assert_eq!(at(0, 0), 0, "padding is black");
        assert_eq!(at(31, 0), 0, "NaN is black");
        assert_eq!(at(30, 0), 255, "outlier saturates");
        // The ramp's middle is mid-grey: the outlier did not squash the window.
        let mid = at(5 + 10, 0);
        assert!((120..=135).contains(&mid), "{mid}");
        assert!(at(5, 1) < 10 && at(24, 49) > 245);
        assert!(no_temp_files(dir.path()));
    }

    #[test]
    fn label_overlay_colours_classes_but_not_padding_or_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay.png");
        let img = Array2::from_shape_fn((8, 8), |(r, c)| (r * 8 + c + 1) as f32);
        let mut lab = Array2::<u8>::zeros((8, 8));
        lab[[0, 0]] = 255;
        lab[[1, 1]] = 1;
        lab[[2, 2]] = 2;
        lab[[3, 3]] = 17; // wraps to the first colour
        write_canvas_png(&path, &img.view(), Some(&lab.view())).unwrap();
        let (info, px) = decode(&path);
        assert_eq!((info.width, info.height, info.color_type), (8, 8, png::ColorType::Rgb));
        let rgb = |r: usize, c: usize| [px[(r * 8 + c) * 3], px[(r * 8 + c) * 3 + 1], px[(r * 8 + c) * 3 + 2]];
        let is_grey = |p: [u8; 3]| p[0] == p[1] && p[1] == p[2];
        assert!(is_grey(rgb(0, 0)) && is_grey(rgb(0, 5)) && is_grey(rgb(7, 7)));
        let (lo, hi) = intensity_window(&img.view(), Some(&lab.view()));
        let g = grey(img[[1, 1]], lo, hi) as f32;
        let want: Vec<u8> = CLASS_COLOURS[0].iter().map(|&c| (0.5 * g + 0.5 * c as f32).round() as u8).collect();
        assert_eq!(rgb(1, 1).to_vec(), want);
        assert_ne!(rgb(1, 1), rgb(2, 2));
        let p = rgb(3, 3);
        assert!(p[0] > p[1] && p[0] > p[2], "class 17 reuses class 1's red: {p:?}");
        // The pixel labelled 255 is excluded from the window: value 1 is not its lower end.
        assert!(lo > 1.0);
    }

    #[test]
    fn titled_png_adds_bands_and_keeps_the_canvas_pixels() {
        use crate::io::text::{BAND, GLYPH, LINE, MARGIN};
        let dir = tempfile::tempdir().unwrap();
        let img = Array2::from_shape_fn((30, 40), |(r, c)| (r * 40 + c + 1) as f32);
        let mut lab = Array2::<u8>::zeros((30, 40));
        lab.slice_mut(s![5..10, 5..10]).fill(1);
        let plain = dir.path().join("plain.png");
        write_canvas_png(&plain, &img.view(), Some(&lab.view())).unwrap();
        let titles = Titles { title: Some("c 7".into()), rows: vec![(0..30, "ax".into())], ..Titles::default() };
        let titled = dir.path().join("titled.png");
        write_titled_png(&titled, &img.view(), Some(&lab.view()), &titles).unwrap();
        let (info, px) = decode(&titled);
        let (top, left) = (2 * MARGIN + LINE, 2 * GLYPH + 2 * MARGIN);
        assert_eq!((info.width, info.height, info.color_type), (40 + left as u32, 30 + top as u32, png::ColorType::Rgb));
        let rgb = |r: usize, c: usize| px[(r * info.width as usize + c) * 3..][..3].to_vec();
        assert_eq!(rgb(0, 0), BAND);
        assert_eq!(rgb(info.height as usize - 1, 0), BAND);
        // The canvas, below and right of the bands, is the untitled picture, pixel for pixel.
        let (_, plain_px) = decode(&plain);
        for r in 0..30 {
            assert_eq!(rgb(top + r, left), plain_px[r * 40 * 3..][..3].to_vec());
            assert_eq!(px[((top + r) * info.width as usize + left) * 3..][..40 * 3], plain_px[r * 40 * 3..][..40 * 3]);
        }
        // A grey canvas becomes RGB, grey repeated.
        let grey = dir.path().join("grey.png");
        write_titled_png(&grey, &img.view(), None, &Titles::default()).unwrap();
        let (info, px) = decode(&grey);
        assert_eq!((info.width, info.height, info.color_type), (40, 30, png::ColorType::Rgb));
        assert!(px.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(write_titled_png(dir.path().join("bad.png"), &img.view(), Some(&lab.slice(s![..29, ..])), &titles).is_err());
        assert!(no_temp_files(dir.path()));
    }

    #[test]
    fn flat_and_empty_content_still_render() {
        let flat = Array2::<f32>::from_elem((3, 3), 5.0);
        assert_eq!(intensity_window(&flat.view(), None), (4.5, 5.5));
        assert_eq!(grey(5.0, 4.5, 5.5), 128);
        let zeros = Array2::<f32>::zeros((3, 3));
        let (lo, hi) = intensity_window(&zeros.view(), None);
        assert!(hi > lo);
    }

    #[test]
    fn failures_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let img = Array2::<f32>::zeros((4, 4));
        // The target is a directory: the rename fails after the temporary file was written.
        let target = dir.path().join("taken.png");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        let e = write_canvas_png(&target, &img.view(), None).unwrap_err().to_string();
        assert!(e.contains("taken.png"), "{e}");
        assert!(no_temp_files(dir.path()));
        // Missing folder.
        let e = write_canvas_png(dir.path().join("nope/c.png"), &img.view(), None).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        // Mismatched label, empty image.
        let lab = Array2::<u8>::zeros((4, 5));
        assert!(write_canvas_png(dir.path().join("a.png"), &img.view(), Some(&lab.view())).is_err());
        let empty = Array2::<f32>::zeros((0, 4));
        assert!(write_canvas_png(dir.path().join("b.png"), &empty.view(), None).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
    /// Every signed axis permutation as a direction matrix (column c = direction of voxel axis c).
    fn signed_permutations() -> Vec<[f64; 9]> {
        let perms = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let mut out = vec![];
        for p in perms {
            for signs in 0..8 {
                let mut d = [0.0; 9];
                for c in 0..3 {
                    d[3 * p[c] + c] = if signs >> c & 1 == 1 { -1.0 } else { 1.0 };
                }
                out.push(d);
            }
        }
        out
    }

    #[test]
    fn oriented_slices_run_along_the_viewer_axes_for_any_axis_order() {
        // Each voxel holds its own linear index, so the reordered array says where it came from.
        let (nz, ny, nx) = (3usize, 4usize, 5usize);
        let vol = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| (k * ny * nx + j * nx + i) as u32);
        for direction in signed_permutations() {
            let g = Geometry { origin: [10.0, -3.0, 7.0], spacing: [1.0, 2.0, 3.0], direction };
            let phys = |v: u32| {
                let v = v as usize;
                g.index_to_physical([(v % nx) as f64, (v / nx % ny) as f64, (v / (nx * ny)) as f64])
            };
            for view in View::ALL {
                let (o, spacing) = oriented(&vol.view(), &g, view);
                let axes = view.screen_axes();
                assert_eq!(o.len(), vol.len());
                for (n, &(lps, sign)) in axes.iter().enumerate() {
                    assert!(o.shape()[n] >= 2);
                    let mut a = [0usize; 3];
                    let v0 = phys(o[a]);
                    a[n] = 1;
                    let v1 = phys(o[a]);
                    // One step along result axis n moves one voxel along the view's axis, in its
                    // direction, and nowhere else.
                    for (q, (p0, p1)) in v0.iter().zip(&v1).enumerate() {
                        let want = if q == lps { sign * spacing[n] } else { 0.0 };
                        assert!((p1 - p0 - want).abs() < 1e-9, "{view:?} axis {n} direction {direction:?}: {v0:?} -> {v1:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn oriented_ras_identity_volume_flips_both_in_plane_axes() {
        // The hippocampus files: RAS-aligned (LPS direction diag(-1, -1, 1)). A viewer shows the
        // patient's right (i = 0) on the screen's right in axial slices and anterior (high j) up.
        let vol = Array3::from_shape_fn((2, 3, 4), |(k, j, i)| (100 * k + 10 * j + i) as u16);
        let g = Geometry { direction: [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0], ..Geometry::default() };
        let (o, _) = oriented(&vol.view(), &g, View::Axial);
        assert_eq!(o.shape(), &[2, 3, 4]);
        assert_eq!(o[[0, 0, 0]], 23, "top left: highest j (anterior), highest i (patient left)");
        assert_eq!(o[[1, 2, 3]], 100);
        let (o, _) = oriented(&vol.view(), &g, View::Coronal);
        assert_eq!(o.shape(), &[3, 2, 4]);
        assert_eq!(o[[0, 0, 0]], 100 + 20 + 3, "slice 0 is the most anterior (j = 2); top row is superior");
        let (o, _) = oriented(&vol.view(), &g, View::Sagittal);
        assert_eq!(o.shape(), &[4, 2, 3]);
        assert_eq!(o[[0, 0, 0]], 100 + 20 + 3, "anterior on the left, superior up; slice 0 is the patient's right");
    }

    #[test]
    fn grid_centres_tiles_in_cells_with_gaps() {
        let a = Array2::<u8>::from_elem((2, 3), 1);
        let b = Array2::<u8>::from_elem((4, 1), 2);
        let c = Array2::<u8>::from_elem((1, 1), 3);
        let g = tile_grid(&[vec![a, b], vec![c]], 1, 0u8);
        // Row heights 4 and 1, column widths 3 and 1, gaps of 1 around: 8 × 7.
        assert_eq!(g.dim(), (1 + 4 + 1 + 1 + 1, 1 + 3 + 1 + 1 + 1));
        assert_eq!(g.iter().filter(|&&v| v == 1).count(), 6);
        assert_eq!(g[[2, 1]], 1, "a centred vertically in its 4-row cell");
        assert_eq!((g[[1, 5]], g[[4, 5]]), (2, 2));
        assert_eq!(g[[6, 2]], 3, "c centred in its 1×3 cell");
        assert_eq!(g.row(0).sum(), 0);
        let (rows, cols) = grid_cells(&[vec![Array2::<u8>::zeros((2, 3)), Array2::zeros((4, 1))], vec![Array2::zeros((1, 1))]], 1);
        assert_eq!((rows, cols), (vec![1..5, 6..7], vec![1..4, 5..6]));
        assert_eq!(grid_cells::<u8>(&[], 3), (vec![], vec![]));
        let e = enlarge(&Array2::from_shape_vec((1, 2), vec![1u8, 2]).unwrap().view(), 2, 3);
        assert_eq!(e, Array2::from_shape_vec((2, 6), vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2]).unwrap());
    }
}
