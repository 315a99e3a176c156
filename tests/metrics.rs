//! Metrics against an independent reference (scipy with medpy 0.5.2's formulas) on real label
//! pairs from ../shared/data, plus the documented edge cases through the public API.
mod common;

use ndarray::{s, Array3};
use sfr::metrics::{binary_metrics, evaluate_labels, ClassMetrics};
use sfr::{Geometry, Volume};
use std::path::Path;

const H001: &str = "hippocampus/labelsTr/hippocampus_001.nii.gz";
const H003: &str = "hippocampus/labelsTr/hippocampus_003.nii.gz";
const H004: &str = "hippocampus/labelsTr/hippocampus_004.nii.gz";
const LA0: &str = "la2018/labelsTr/06SR5RBREL16DQ6M8LWS.nii.gz";
const LA1: &str = "la2018/labelsTr/0RZDK210BSMWAA6467LU.nii.gz";

/// Same table as PAIRS in tests/reference/metrics_reference.py: pred = shift(crop(A)),
/// ref = crop(B); crop keeps the first n voxels of each axis (n = the smaller size), shift
/// moves voxels by (di, dj, dk) with zero fill; spacing (sx, sy, sz) replaces the header's
/// (the Python side checks it equals the header's for the non-"aniso" pairs).
struct Pair {
    name: &'static str,
    a: &'static str,
    b: &'static str,
    shift_ijk: [isize; 3],
    spacing: [f64; 3],
    classes: &'static [u16],
}

const PAIRS: &[Pair] = &[
    Pair { name: "hippo001_shift_i", a: H001, b: H001, shift_ijk: [1, 0, 0], spacing: [1.0, 1.0, 1.0], classes: &[1, 2] },
    Pair { name: "hippo001_shift_jk_aniso", a: H001, b: H001, shift_ijk: [0, 1, -2], spacing: [0.7, 1.3, 2.9], classes: &[1, 2] },
    Pair { name: "hippo003_vs_004", a: H003, b: H004, shift_ijk: [0, 0, 0], spacing: [1.0, 1.0, 1.0], classes: &[1, 2] },
    Pair { name: "hippo003_vs_004_aniso", a: H003, b: H004, shift_ijk: [0, 0, 0], spacing: [1.6, 0.9, 0.45], classes: &[1, 2] },
    Pair { name: "la0_shift", a: LA0, b: LA0, shift_ijk: [2, -1, 1], spacing: [0.625, 0.625, 0.625], classes: &[1] },
    Pair { name: "la0_vs_la1", a: LA0, b: LA1, shift_ijk: [0, 0, 0], spacing: [0.625, 0.625, 0.625], classes: &[1] },
];

// Generated once with (numpy 2.4.6, scipy 1.17.1, nibabel 5.4.2 in the project venv):
//   cd /work/main && source scripts/env.sh && \
//   PYTHONPATH=/tmp/medpy_dl/medpy-0.5.2 python tests/reference/metrics_reference.py ../shared/data
// where /tmp/medpy_dl/medpy-0.5.2 is the unpacked `pip download --no-deps medpy==0.5.2` sdist:
// the script's scipy re-implementation and medpy's own dc/jc/asd/assd/hd/hd95 agreed exactly.
// name, class, dice, jaccard, asd, assd, hd, hd95
type Row = (&'static str, u16, f64, f64, f64, f64, f64, f64);
#[rustfmt::skip]
const EXPECTED: &[Row] = &[
    ("hippo001_shift_i", 1, 0.8987915407854985, 0.8161865569272977, 0.41007194244604317, 0.41007194244604317, 1.0, 1.0),
    ("hippo001_shift_i", 2, 0.8799261083743842, 0.7855964815832875, 0.43967828418230565, 0.43967828418230565, 1.0, 1.0),
    ("hippo001_shift_jk_aniso", 1, 0.7205438066465257, 0.5631641086186541, 1.550583610801066, 1.6544028615082729, 5.943904440685432, 5.8),
    ("hippo001_shift_jk_aniso", 2, 0.7007389162561576, 0.5393364928909953, 1.2739745621079668, 1.3387709374309829, 5.943904440685432, 3.1780497164141406),
    ("hippo003_vs_004", 1, 0.7894736842105263, 0.6521739130434783, 0.7694132258709323, 0.8264599693923527, 3.7416573867739413, 1.7320508075688772),
    ("hippo003_vs_004", 2, 0.7277187244480785, 0.5719794344473008, 0.8845425810788379, 0.8882732917386955, 4.358898943540674, 2.23606797749979),
    ("hippo003_vs_004_aniso", 1, 0.7894736842105263, 0.6521739130434783, 0.44543610637038, 0.516925846311982, 3.587826640182048, 1.2727922061357855),
    ("hippo003_vs_004_aniso", 2, 0.7277187244480785, 0.5719794344473008, 0.631010002073733, 0.5939032970231048, 5.0022494939776845, 1.8),
    ("la0_shift", 1, 0.9262651008451288, 0.8626571619998431, 0.6400340909329001, 0.6381846834379119, 1.5309310892394863, 1.25),
    ("la0_vs_la1", 1, 0.5723602026262725, 0.40091359436685703, 3.5479304895228445, 4.449448783223576, 26.911312677013733, 10.038986502630632),
];

/// Dice/Jaccard are ratios of voxel counts and must agree to rounding; distances come from
/// two different exact EDTs and summation orders, so they agree far below this tolerance.
const RATIO_TOL: f64 = 1e-12;
const DIST_TOL_MM: f64 = 1e-9;

fn load_labels(root: &Path, rel: &str) -> Array3<u8> {
    let path = root.join(rel);
    let v = sfr::io::nifti::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v.cast::<u8>().data
}

/// Voxels moved by `shift_ijk` (i, j, k) with zero fill; the array is [k, j, i].
fn shift(a: &Array3<u8>, shift_ijk: [isize; 3]) -> Array3<u8> {
    let d = [shift_ijk[2], shift_ijk[1], shift_ijk[0]];
    let sh = a.shape();
    let src = |ax: usize| (-d[ax]).max(0) as usize..(sh[ax] as isize - d[ax].max(0)) as usize;
    let dst = |ax: usize| d[ax].max(0) as usize..(sh[ax] as isize - (-d[ax]).max(0)) as usize;
    let mut out = Array3::zeros(a.raw_dim());
    out.slice_mut(s![dst(0), dst(1), dst(2)]).assign(&a.slice(s![src(0), src(1), src(2)]));
    out
}

fn pair_volumes(root: &Path, p: &Pair) -> (Volume<u8>, Volume<u8>) {
    let (a, b) = (load_labels(root, p.a), load_labels(root, p.b));
    let n: Vec<usize> = a.shape().iter().zip(b.shape()).map(|(x, y)| *x.min(y)).collect();
    let crop = s![..n[0], ..n[1], ..n[2]];
    let g = Geometry { spacing: p.spacing, ..Default::default() };
    let pred = shift(&a.slice(crop).to_owned(), p.shift_ijk);
    (Volume::new(pred, g), Volume::new(b.slice(crop).to_owned(), g))
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

#[test]
fn real_label_pairs_match_scipy_medpy_reference() {
    let Some(root) = common::shared_data() else { return };
    let mut checked = 0;
    for p in PAIRS {
        let (pred, reference) = pair_volumes(&root, p);
        let got = evaluate_labels(&pred, &reference, p.classes).unwrap();
        for m in &got {
            let want = EXPECTED
                .iter()
                .find(|e| e.0 == p.name && e.1 == m.class)
                .unwrap_or_else(|| panic!("no reference for {} class {}", p.name, m.class));
            let d = |o: Option<f64>| o.unwrap_or_else(|| panic!("{} class {}: distance is None", p.name, m.class));
            let checks = [
                ("dice", m.dice, want.2, RATIO_TOL),
                ("jaccard", m.jaccard, want.3, RATIO_TOL),
                ("asd", d(m.asd), want.4, DIST_TOL_MM),
                ("assd", d(m.assd), want.5, DIST_TOL_MM),
                ("hd", d(m.hd), want.6, DIST_TOL_MM),
                ("hd95", d(m.hd95), want.7, DIST_TOL_MM),
            ];
            for (what, g, w, tol) in checks {
                assert!(close(g, w, tol), "{} class {}: {what} = {g}, reference {w}", p.name, m.class);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, EXPECTED.len());
}

#[test]
fn real_label_edge_cases() {
    let Some(root) = common::shared_data() else { return };
    let labels = load_labels(&root, H001);
    let g = Geometry { spacing: [1.0, 1.0, 1.0], ..Default::default() };
    let reference = Volume::new(labels.clone(), g);

    // Identical: Dice 1, every distance 0.
    for m in evaluate_labels(&reference, &reference, &[1, 2]).unwrap() {
        assert_eq!((m.dice, m.jaccard), (1.0, 1.0));
        assert_eq!((m.asd, m.assd, m.hd, m.hd95), (Some(0.0), Some(0.0), Some(0.0), Some(0.0)));
    }

    // Empty prediction: Dice 0, distances undefined and serialised as null; a class absent
    // from both (3) counts as perfect agreement.
    let empty = Volume::new(Array3::<u8>::zeros(labels.raw_dim()), g);
    let res = evaluate_labels(&empty, &reference, &[1, 3]).unwrap();
    assert_eq!((res[0].dice, res[0].jaccard, res[0].asd, res[0].hd95), (0.0, 0.0, None, None));
    assert!(res[0].ref_voxels > 0 && res[0].pred_voxels == 0);
    assert_eq!((res[1].dice, res[1].assd, res[1].hd95), (1.0, Some(0.0), Some(0.0)));
    let json = serde_json::to_value(&res).unwrap();
    assert!(json[0]["asd"].is_null() && json[0]["hd95"].is_null(), "{json}");
    assert_eq!(json[1]["hd95"], 0.0);
    let back: Vec<ClassMetrics> = serde_json::from_value(json).unwrap();
    assert_eq!(back, res);

    // A prediction on another grid is refused, not compared.
    let cropped = Volume::new(labels.slice(s![.., .., 1..]).to_owned(), g);
    let err = evaluate_labels(&cropped, &reference, &[1]).unwrap_err().to_string();
    assert!(err.contains("dims"), "{err}");
}

/// Rough timing of the worst case (the object fills a whole 512×512×300 volume, so nothing is
/// cropped away). Not a timed assert: run with `--ignored --nocapture` to see the numbers.
#[test]
#[ignore]
fn large_volume_timing() {
    let (nz, ny, nx) = (300, 512, 512);
    // Two overlapping ellipsoids filling most of the volume.
    let ball = |c: [f64; 3], r: [f64; 3]| {
        Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
            let q = [(k as f64 - c[0]) / r[0], (j as f64 - c[1]) / r[1], (i as f64 - c[2]) / r[2]];
            q.iter().map(|v| v * v).sum::<f64>() <= 1.0
        })
    };
    let p = ball([150.0, 256.0, 256.0], [149.0, 255.0, 255.0]);
    let r = ball([155.0, 250.0, 260.0], [140.0, 240.0, 250.0]);
    let t = std::time::Instant::now();
    let m = binary_metrics(&p.view(), &r.view(), [0.7, 0.7, 1.5]).unwrap();
    eprintln!("512x512x300 binary_metrics: {:.2} s  {m:?}", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let d = sfr::metrics::distance_transform(&sfr::metrics::surface(&r.view()).view(), [0.7, 0.7, 1.5]).unwrap();
    eprintln!("512x512x300 full distance_transform: {:.2} s (max {:.2} mm)", t.elapsed().as_secs_f64(), d.fold(0.0f64, |a, &b| a.max(b)));
}
