//! Property tests of stitching: the inverse is exact, padding is where it should be, and every
//! voxel lands on the canvas exactly once, for random slice shapes, depths and canvases.
use ndarray::{s, Array2, Array3, Array4, Axis};
use proptest::prelude::*;
use sfr::stitch::{self, StitchLayout, LABEL_PAD};

/// (h, w, d, canvas) with every slice fitting and d ≤ the number of cells.
fn layout_params() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (1usize..=12, 1usize..=12)
        .prop_flat_map(|(h, w)| (Just(h), Just(w), h.max(w)..=40))
        .prop_flat_map(|(h, w, canvas)| {
            let max = (canvas / h) * (canvas / w);
            (Just(h), Just(w), 1..=max.min(64), Just(canvas))
        })
}

fn labels_case() -> impl Strategy<Value = (StitchLayout, Array3<u8>)> {
    layout_params().prop_flat_map(|(h, w, d, canvas)| {
        let layout = StitchLayout::new(h, w, d, canvas).unwrap();
        // 255 is the padding value; real labels never use it.
        proptest::collection::vec(0u8..LABEL_PAD, d * h * w)
            .prop_map(move |v| (layout, Array3::from_shape_vec((d, h, w), v).unwrap()))
    })
}

fn probabilities_case() -> impl Strategy<Value = (StitchLayout, Array4<f32>)> {
    (layout_params(), 1usize..=3).prop_flat_map(|((h, w, d, canvas), c)| {
        let layout = StitchLayout::new(h, w, d, canvas).unwrap();
        proptest::collection::vec(0f32..=1.0, c * d * h * w)
            .prop_map(move |v| (layout, Array4::from_shape_vec((c, d, h, w), v).unwrap()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn labels_round_trip_and_pad_with_255((layout, vol) in labels_case()) {
        let canvas = stitch::stitch_labels(&vol.view(), &layout).unwrap();
        prop_assert_eq!(canvas.dim(), (layout.canvas, layout.canvas));
        prop_assert_eq!(stitch::unstitch_labels(&canvas.view(), &layout).unwrap(), vol.clone());
        // The volume holds no 255, so the 255s on the canvas are exactly its padding.
        let pad = canvas.iter().filter(|&&x| x == LABEL_PAD).count();
        prop_assert_eq!(pad, layout.canvas * layout.canvas - vol.len());
        // Every slice is where slice_origin says.
        for k in 0..layout.d {
            let (r0, c0) = layout.slice_origin(k).unwrap();
            prop_assert_eq!(canvas.slice(s![r0..r0 + layout.h, c0..c0 + layout.w]), vol.index_axis(Axis(0), k));
        }
    }

    #[test]
    fn probabilities_round_trip((layout, probs) in probabilities_case()) {
        let c = probs.shape()[0];
        let mut maps = ndarray::Array3::<f32>::zeros((c, layout.canvas, layout.canvas));
        for (mut m, p) in maps.outer_iter_mut().zip(probs.outer_iter()) {
            m.assign(&stitch::stitch_image(&p, &layout).unwrap());
        }
        prop_assert_eq!(stitch::unstitch_probabilities(&maps.view(), &layout).unwrap(), probs);
    }

    #[test]
    fn every_voxel_lands_once_and_padding_is_zero((h, w, d, canvas) in layout_params()) {
        let layout = StitchLayout::new(h, w, d, canvas).unwrap();
        // Distinct non-zero values: the canvas's non-zero pixels must be exactly 1..=n, once each.
        let n = d * h * w;
        let vol = Array3::from_shape_vec((d, h, w), (1..=n).map(|x| x as f32).collect()).unwrap();
        let img = stitch::stitch_image(&vol.view(), &layout).unwrap();
        let mut seen: Vec<f32> = img.iter().copied().filter(|&x| x != 0.0).collect();
        prop_assert_eq!(seen.len(), n);
        seen.sort_by(f32::total_cmp);
        prop_assert!(seen.iter().enumerate().all(|(i, &x)| x == (i + 1) as f32));
        prop_assert_eq!(img.iter().filter(|&&x| x == 0.0).count(), canvas * canvas - n);
        prop_assert_eq!(stitch::unstitch(&img.view(), &layout).unwrap(), vol);
    }

    #[test]
    fn layout_is_centred((h, w, d, canvas) in layout_params()) {
        let l = StitchLayout::new(h, w, d, canvas).unwrap();
        let m = l.n_row * l.n_col - d;
        prop_assert!(2 * l.pad_before <= m && m - 2 * l.pad_before <= 1, "missing slices split m div 2 before");
        prop_assert!(l.n_row * l.cell_h <= canvas && l.n_col * l.cell_w <= canvas);
        prop_assert!(l.cell_h >= h && l.cell_w >= w);
        let spare_h = canvas - l.n_row * l.cell_h;
        prop_assert_eq!(l.off_h, spare_h / 2);
        prop_assert_eq!(l.tile_off_h, (l.cell_h - h) / 2);
        prop_assert_eq!(l.tile_off_w, (l.cell_w - w) / 2);
        // One more slice than fits is refused with a message naming the limit.
        let over = StitchLayout::new(h, w, l.n_row * l.n_col + 1, canvas).unwrap_err().to_string();
        prop_assert!(over.contains(&format!("at most {}", l.n_row * l.n_col)), "{}", over);
    }

    #[test]
    fn strided_views_stitch_like_their_copies((h, w, d, canvas) in layout_params(), a in 0usize..3, b in 0usize..3) {
        // A crop of a larger volume is not contiguous; the result must not depend on that.
        let big = Array3::from_shape_fn((d + a, h + b, w + a + b), |(k, j, i)| (k * 1000 + j * 37 + i) as f32 + 1.0);
        let view = big.slice(s![a.., b.., a..a + w]);
        let layout = StitchLayout::new(h, w, d, canvas).unwrap();
        let want = stitch::stitch_image(&view.to_owned().view(), &layout).unwrap();
        prop_assert_eq!(&stitch::stitch_image(&view, &layout).unwrap(), &want);
        let mut into = Array2::<f32>::from_elem((canvas, canvas), f32::NAN);
        stitch::stitch_into(&view, &layout, 0.0, &mut into.view_mut()).unwrap();
        prop_assert_eq!(&into, &want);
    }
}

#[test]
fn paper_grids() {
    assert_eq!(StitchLayout::for_shape(&[80, 112, 112], 1024).map(|l| (l.n_row, l.n_col)).unwrap(), (9, 9));
    assert_eq!(StitchLayout::for_shape(&[96, 96, 96], 1024).map(|l| (l.n_row, l.n_col)).unwrap(), (10, 10));
}
