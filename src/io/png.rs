//! PNG output of stitched canvases, for people to look at.
//!
//! The image is windowed to 8-bit grey; a label canvas, when given, is blended over it with a
//! fixed colour per class. This is a picture, not data: use NIfTI to keep values.
use crate::error::{Error, Result};
use ndarray::ArrayView2;
use std::fs::File;
use std::io::BufWriter;
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
    let last = v.len() - 1;
    let lo_at = (WINDOW_PERCENTILES.0 * last as f64).floor() as usize;
    let hi_at = (WINDOW_PERCENTILES.1 * last as f64).ceil() as usize;
    let lo = *v.select_nth_unstable_by(lo_at, f32::total_cmp).1;
    let hi = *v.select_nth_unstable_by(hi_at, f32::total_cmp).1;
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

/// Writes `image` (a canvas, row = PNG row) as an 8-bit grey PNG, or as RGB with `label`
/// blended over it in [`CLASS_COLOURS`]. The file is written beside `path` under a temporary
/// name and renamed into place, so a failure never leaves a partial PNG at `path`.
pub fn write_canvas_png(path: impl AsRef<Path>, image: &ArrayView2<f32>, label: Option<&ArrayView2<u8>>) -> Result<()> {
    let path = path.as_ref();
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
    let mut tmp = TempFile { path: crate::io::temp_sibling(path, ".tmp"), keep: false };
    let pixels = render(image, label);
    let file = File::create(&tmp.path).map_err(|e| Error::io(&tmp.path, e))?;
    let enc_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => Error::io(path, e),
        e => Error::format(path, format!("PNG encoding failed: {e}")),
    };
    let mut enc = png::Encoder::new(BufWriter::new(&file), wu, hu);
    enc.set_color(if label.is_some() { png::ColorType::Rgb } else { png::ColorType::Grayscale });
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(enc_err)?;
    writer.write_image_data(&pixels).map_err(enc_err)?;
    // `finish` flushes the buffer and reports its errors; syncing makes the rename publish a
    // complete file even across a crash.
    writer.finish().map_err(enc_err)?;
    file.sync_all().map_err(|e| Error::io(&tmp.path, e))?;
    std::fs::rename(&tmp.path, path).map_err(|e| Error::io(path, e))?;
    tmp.keep = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

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
}
