//! Titles drawn into pictures: white text on dark bands added above and to the left of an RGB
//! picture, so that the picture says what its columns and rows show. The glyphs are the
//! public-domain 8×8 bitmap font of the `font8x8` crate, each pixel drawn as a
//! [`SCALE`]×[`SCALE`] square.
use font8x8::UnicodeFonts;
use ndarray::{s, Array3, ArrayView3};
use std::ops::Range;

/// Size of a glyph pixel on the picture, in picture pixels.
pub const SCALE: usize = 2;

/// Width and height of one character on the picture, in pixels.
pub const GLYPH: usize = 8 * SCALE;

/// Height of a line of text: a character and the space below it.
pub const LINE: usize = GLYPH + 4;

/// Space between a band's edge and its text, in pixels.
pub const MARGIN: usize = 6;

/// Colour of the bands.
pub const BAND: [u8; 3] = [40, 40, 40];

/// Colour of the text.
pub const INK: [u8; 3] = [255, 255, 255];

/// The 8 rows of `c`'s glyph (bit 0 of a row is its leftmost pixel): ASCII, Latin-1 and Greek
/// letters; any other character shows as `?`.
fn glyph(c: char) -> [u8; 8] {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .expect("the basic font has '?'")
}

/// Draws `text` on one line with the top-left corner of its first character at (`top`, `left`)
/// of `pic` (`[row, column, channel]`, RGB): only the glyphs' pixels are set, to `colour`; what
/// falls outside the picture is cut off.
pub fn draw_text(pic: &mut Array3<u8>, top: usize, left: usize, text: &str, colour: [u8; 3]) {
    let (h, w, _) = pic.dim();
    for (n, c) in text.chars().enumerate() {
        let x0 = left + n * GLYPH;
        if x0 >= w {
            break;
        }
        for (gy, bits) in glyph(c).iter().enumerate() {
            for gx in (0..8).filter(|gx| bits >> gx & 1 == 1) {
                let (y, x) = (top + gy * SCALE, x0 + gx * SCALE);
                if y < h && x < w {
                    for (ch, &v) in colour.iter().enumerate() {
                        pic.slice_mut(s![y..(y + SCALE).min(h), x..(x + SCALE).min(w), ch]).fill(v);
                    }
                }
            }
        }
    }
}

/// `text` broken into lines of at most `max_chars` characters, at spaces; a word longer than a
/// line is broken inside. Runs of white space become one space.
pub fn wrap(text: &str, max_chars: usize) -> Vec<String> {
    let max = max_chars.max(1);
    let mut lines: Vec<String> = vec![];
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        let used = line.chars().count();
        if used > 0 && used + 1 + word.len() <= max {
            line.push(' ');
            line.extend(word);
            continue;
        }
        if used > 0 {
            lines.push(std::mem::take(&mut line));
        }
        while word.len() > max {
            lines.push(word.drain(..max).collect());
        }
        line = word.into_iter().collect();
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// What to write around a picture. Positions are pixel rows and columns of the picture itself,
/// before the bands are added.
#[derive(Clone, Debug, Default)]
pub struct Titles {
    /// Lines at the very top, from the left edge, wrapped to the width of the result.
    pub title: Option<String>,
    /// Column titles, each centred over its columns and wrapped to their width; the titles of
    /// all columns end on the same line, just above the picture.
    pub columns: Vec<(Range<usize>, String)>,
    /// Row titles, each on one line centred beside its rows, in a band on the left as wide as
    /// the longest.
    pub rows: Vec<(Range<usize>, String)>,
}

/// `pic` (`[row, column, channel]`, RGB) with a band of [`BAND`] on the left holding the row
/// titles and one above holding the title and the column titles, in [`INK`]. The picture's own
/// pixels are copied unchanged; without titles the result is the picture.
pub fn with_titles(pic: &ArrayView3<u8>, titles: &Titles) -> Array3<u8> {
    let (h, w, _) = pic.dim();
    let left = match titles.rows.iter().map(|(_, t)| t.chars().count()).max() {
        Some(n) => n * GLYPH + 2 * MARGIN,
        None => 0,
    };
    let title_lines = match &titles.title {
        Some(t) => wrap(t, (left + w).saturating_sub(2 * MARGIN) / GLYPH),
        None => vec![],
    };
    let column_lines: Vec<Vec<String>> = titles.columns.iter().map(|(r, t)| wrap(t, r.len() / GLYPH)).collect();
    let n_column_lines = column_lines.iter().map(Vec::len).max().unwrap_or(0);
    let top = match title_lines.len() + n_column_lines {
        0 => 0,
        n => 2 * MARGIN + n * LINE,
    };
    let mut out = Array3::from_shape_fn((top + h, left + w, 3), |(_, _, c)| BAND[c]);
    out.slice_mut(s![top.., left.., ..]).assign(&pic.slice(s![.., .., 0..3]));
    for (n, line) in title_lines.iter().enumerate() {
        draw_text(&mut out, MARGIN + n * LINE, MARGIN, line, INK);
    }
    for ((range, _), lines) in titles.columns.iter().zip(&column_lines) {
        let first = MARGIN + (title_lines.len() + n_column_lines - lines.len()) * LINE;
        for (n, line) in lines.iter().enumerate() {
            let width = line.chars().count() * GLYPH;
            draw_text(&mut out, first + n * LINE, left + range.start + range.len().saturating_sub(width) / 2, line, INK);
        }
    }
    for (range, line) in &titles.rows {
        let width = line.chars().count() * GLYPH;
        let x = MARGIN + (left - 2 * MARGIN - width) / 2;
        draw_text(&mut out, top + range.start + range.len().saturating_sub(GLYPH) / 2, x, line, INK);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounding box `(rows, columns)` of the pixels of `pic` equal to `colour`.
    fn ink_box(pic: &ArrayView3<u8>, colour: [u8; 3]) -> Option<(Range<usize>, Range<usize>)> {
        let (h, w, _) = pic.dim();
        let hits: Vec<(usize, usize)> =
            (0..h).flat_map(|y| (0..w).map(move |x| (y, x))).filter(|&(y, x)| (0..3).all(|c| pic[[y, x, c]] == colour[c])).collect();
        let (ys, xs): (Vec<usize>, Vec<usize>) = hits.into_iter().unzip();
        Some((*ys.iter().min()?..ys.iter().max()? + 1, *xs.iter().min()?..xs.iter().max()? + 1))
    }

    #[test]
    fn text_marks_only_its_own_box_with_the_font_s_glyphs() {
        let mut pic = Array3::<u8>::zeros((40, 100, 3));
        draw_text(&mut pic, 10, 20, "Hi", INK);
        let (rows, cols) = ink_box(&pic.view(), INK).expect("something was drawn");
        assert!(rows.start >= 10 && rows.end <= 10 + GLYPH, "{rows:?}");
        assert!(cols.start >= 20 && cols.end <= 20 + 2 * GLYPH, "{cols:?}");
        // Nothing but ink or the untouched black.
        assert!(pic.iter().all(|&v| v == 0 || v == 255));
        // 'H' starts with the row ██··██··: its first two glyph pixels are lit, the third is
        // not (bit 0 is the leftmost pixel), each drawn SCALE × SCALE.
        assert_eq!(pic[[10, 20, 0]], 255);
        assert_eq!(pic[[11, 20 + 2 * SCALE - 1, 1]], 255);
        assert_eq!(pic[[10, 20 + 2 * SCALE, 2]], 0);
        assert_eq!(pic[[10, 20 + 4 * SCALE, 0]], 255);
        // A character without a glyph is drawn as '?'; text past the edges is cut off.
        let (mut a, mut b) = (Array3::<u8>::zeros((16, 16, 3)), Array3::<u8>::zeros((16, 16, 3)));
        draw_text(&mut a, 0, 0, "\u{4e00}", INK);
        draw_text(&mut b, 0, 0, "?", INK);
        assert_eq!(a, b);
        assert!(a.iter().any(|&v| v != 0));
        let mut small = Array3::<u8>::zeros((5, 7, 3));
        draw_text(&mut small, 3, 2, "WWW", INK);
        draw_text(&mut small, 9, 9, "W", INK);
        assert!(small.iter().any(|&v| v != 0));
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_inside_long_words() {
        assert_eq!(wrap("SFR (mean teacher)", 12), ["SFR (mean", "teacher)"]);
        assert_eq!(wrap("SFR (mean teacher)", 18), ["SFR (mean teacher)"]);
        assert_eq!(wrap("  a   b ", 3), ["a b"]);
        assert_eq!(wrap("hippocampus_001", 6), ["hippoc", "ampus_", "001"]);
        assert_eq!(wrap("ab cdefgh", 3), ["ab", "cde", "fgh"]);
        assert_eq!(wrap("abc", 0), ["a", "b", "c"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn titles_sit_in_bands_above_and_left_of_an_unchanged_picture() {
        // A picture of two 100-pixel columns and two 40-pixel rows, in a colour no band uses.
        let (h, w) = (80, 200);
        let pic = Array3::<u8>::from_shape_fn((h, w, 3), |(y, x, c)| [10, 200, 30][c] + (y + x) as u8 % 7);
        let titles = Titles {
            title: Some("a title".into()),
            columns: vec![(0..100, "one".into()), (100..200, "second column".into())],
            rows: vec![(0..40, "axial".into()), (40..80, "sagittal".into())],
        };
        let out = with_titles(&pic.view(), &titles);
        // Left band: the longest row title ("sagittal") and its margins; top band: the title's
        // line, and two lines for "second column" (12 characters fit 100 pixels at most 6).
        let left = 8 * GLYPH + 2 * MARGIN;
        let top = 2 * MARGIN + 3 * LINE;
        assert_eq!(out.dim(), (top + h, left + w, 3));
        assert_eq!(out.slice(s![top.., left.., ..]), pic, "the picture is copied unchanged");
        let band = out.slice(s![..top, .., ..]);
        let is_band_or_ink = |p: ndarray::ArrayView1<u8>| p.to_vec() == BAND || p.to_vec() == INK;
        assert!(band.lanes(ndarray::Axis(2)).into_iter().all(is_band_or_ink));
        assert!(out.slice(s![.., ..left, ..]).lanes(ndarray::Axis(2)).into_iter().all(is_band_or_ink));
        // Each text lands in its own place. Ink box of a part of the result, in the result's
        // coordinates.
        let ink = |rows: Range<usize>, cols: Range<usize>| {
            let (r, c) = ink_box(&out.slice(s![rows.clone(), cols.clone(), ..]), INK)?;
            Some((r.start + rows.start..r.end + rows.start, c.start + cols.start..c.end + cols.start))
        };
        let line = |n: usize| MARGIN + n * LINE..MARGIN + (n + 1) * LINE;
        let (_, c) = ink(line(0), 0..left + w).expect("the title");
        assert!(c.start >= MARGIN && c.end <= MARGIN + 7 * GLYPH, "{c:?}");
        let (_, c) = ink(line(1), 0..left + w).expect("the first line of the second column's title");
        assert!(c.start >= left + 100 && c.end <= left + 200, "over its column: {c:?}");
        // Last line: "one" and "column", each centred over its column.
        let (_, c) = ink(line(2), 0..left + 100).expect("the first column's title");
        assert!(c.start >= left + 50 - 2 * GLYPH && c.end <= left + 50 + 2 * GLYPH, "centred over its column: {c:?}");
        let (_, c) = ink(line(2), left + 100..left + w).expect("the second line of the second column's title");
        assert!(c.start >= left + 150 - 3 * GLYPH && c.end <= left + 150 + 3 * GLYPH, "{c:?}");
        for (n, name) in ["axial", "sagittal"].iter().enumerate() {
            let (r, c) = ink(top + 40 * n..top + 40 * (n + 1), 0..left).expect(name);
            assert!(r.start >= top + 40 * n + 12 - 2 && r.end <= top + 40 * n + 12 + GLYPH, "{name} beside its row: {r:?}");
            assert!(c.start >= MARGIN && c.end <= left - MARGIN, "{name} in the left band: {c:?}");
        }
        assert!(ink(line(1).start..top, 0..left).is_none(), "nothing in the corner below the title");
        // No titles: the picture itself.
        assert_eq!(with_titles(&pic.view(), &Titles::default()), pic);
    }
}
