//! The C ABI seen from Rust: the committed header matches the code and Cargo.toml's version,
//! stitching through the ABI equals the library's, and handles are checked. (The full C-side
//! exercise, under valgrind, is tests/c/test_capi.c, run by scripts/test_c.sh.)
use sfr::ffi::*;
use sfr::stitch::{self, StitchLayout};
use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn last_error() -> String {
    let n = unsafe { sfr_last_error_message(std::ptr::null_mut(), 0) };
    let mut buf = vec![0 as c_char; n];
    unsafe { sfr_last_error_message(buf.as_mut_ptr(), n) };
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let header = std::fs::read_to_string(root().join("include/sfr.h")).expect("include/sfr.h");
    let want = [
        format!("#define SFR_VERSION_MAJOR {}", env!("CARGO_PKG_VERSION_MAJOR")),
        format!("#define SFR_VERSION_MINOR {}", env!("CARGO_PKG_VERSION_MINOR")),
        format!("#define SFR_VERSION_PATCH {}", env!("CARGO_PKG_VERSION_PATCH")),
        format!("#define SFR_VERSION \"{}\"", env!("CARGO_PKG_VERSION")),
    ];
    for w in &want {
        assert!(
            header.lines().any(|l| l == w),
            "include/sfr.h lacks `{w}`: update after_includes in cbindgen.toml and regenerate the header"
        );
    }
    let v = unsafe { CStr::from_ptr(sfr_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
}

/// The committed header equals a fresh cbindgen run. scripts/test_c.sh (ctest
/// sfr_header_fresh) always checks this; here it runs when cbindgen is installed.
#[test]
fn header_is_fresh() {
    let cbindgen = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/cbindgen")).filter(|p| p.exists()).unwrap_or_else(|| "cbindgen".into());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sfr.h");
    let run = Command::new(&cbindgen).args(["--config", "cbindgen.toml", "--crate", "sfr", "--output"]).arg(&out).current_dir(root()).output();
    match run {
        Err(_) => eprintln!("SKIPPED: cbindgen not installed (scripts/test_c.sh checks the header)"),
        Ok(o) => {
            assert!(o.status.success(), "cbindgen failed: {}", String::from_utf8_lossy(&o.stderr));
            let fresh = std::fs::read_to_string(&out).unwrap();
            let committed = std::fs::read_to_string(root().join("include/sfr.h")).unwrap();
            assert!(fresh == committed, "include/sfr.h is stale: cbindgen --config cbindgen.toml --crate sfr --output include/sfr.h");
        }
    }
}

fn view<T>(data: &[T], dtype: sfr_dtype, dims: [usize; 3]) -> sfr_volume_view {
    sfr_volume_view {
        data: data.as_ptr() as *const _,
        data_len: std::mem::size_of_val(data),
        dtype: dtype as i32,
        dims,
        spacing: [1.0; 3],
        origin: [0.0; 3],
        direction: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    }
}

#[test]
fn stitching_through_the_abi_equals_the_library() {
    let dims = [13usize, 9, 11]; // x, y, z
    let n: usize = dims.iter().product();
    let img: Vec<i16> = (0..n).map(|i| (i as i16).wrapping_mul(31) - 700).collect();
    let lab: Vec<u8> = (0..n).map(|i| (i % 5) as u8).collect();
    let canvas = 64;
    let (mut n_row, mut n_col) = (0, 0);
    assert_eq!(unsafe { sfr_stitch_layout(dims.as_ptr(), canvas, &mut n_row, &mut n_col) }, SFR_OK);
    let layout = StitchLayout::new(dims[1], dims[0], dims[2], canvas).unwrap();
    assert_eq!((n_row, n_col), (layout.n_row, layout.n_col));

    let mut out = vec![0f32; canvas * canvas];
    let v = view(&img, sfr_dtype::SFR_DTYPE_I16, dims);
    assert_eq!(unsafe { sfr_stitch_image(&v, canvas, out.as_mut_ptr(), out.len()) }, SFR_OK);
    let vol = ndarray::Array3::from_shape_vec((dims[2], dims[1], dims[0]), img.iter().map(|&x| x as f32).collect()).unwrap();
    let want = stitch::stitch_image(&vol.view(), &layout).unwrap();
    assert_eq!(out.as_slice(), want.as_slice().unwrap());

    let mut lc = vec![0u8; canvas * canvas];
    let vl = view(&lab, sfr_dtype::SFR_DTYPE_U8, dims);
    assert_eq!(unsafe { sfr_stitch_labels(&vl, canvas, lc.as_mut_ptr(), lc.len()) }, SFR_OK);
    let mut back = vec![0u8; n];
    assert_eq!(unsafe { sfr_unstitch_labels(lc.as_ptr(), lc.len(), canvas, dims.as_ptr(), back.as_mut_ptr(), n) }, SFR_OK);
    assert_eq!(back, lab);

    // An out-of-range dtype is read as an integer and rejected, never turned into an enum.
    let mut bad = v;
    bad.dtype = 8;
    assert_eq!(unsafe { sfr_stitch_image(&bad, canvas, out.as_mut_ptr(), out.len()) }, SFR_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("unknown dtype 8"), "{}", last_error());
}

#[test]
fn handles_are_checked_by_kind_and_liveness() {
    let classes = CString::new(r#"{"0": "background", "1": "organ", "2": "lesion"}"#).unwrap();
    let mut ds: *mut sfr_dataset = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_dataset_new(classes.as_ptr(), &mut ds) }, SFR_OK);
    let (mut l, mut u) = (7, 7);
    assert_eq!(unsafe { sfr_dataset_counts(ds, &mut l, &mut u) }, SFR_OK);
    assert_eq!((l, u), (0, 0));

    // A dataset handle where a model is expected.
    let mut nc = 0;
    assert_eq!(unsafe { sfr_model_num_classes(ds as *const sfr_model, &mut nc) }, SFR_ERR_BAD_HANDLE);
    assert!(last_error().contains("is an sfr_dataset, not an sfr_model"), "{}", last_error());
    // Freeing it as a model does nothing to it.
    unsafe { sfr_model_free(ds as *mut sfr_model) };
    assert_eq!(unsafe { sfr_dataset_counts(ds, &mut l, &mut u) }, SFR_OK);

    unsafe { sfr_dataset_free(ds) };
    assert_eq!(unsafe { sfr_dataset_counts(ds, &mut l, &mut u) }, SFR_ERR_BAD_HANDLE);
    unsafe { sfr_dataset_free(ds) }; // detected, harmless
    assert!(last_error().contains("not a live sfr_dataset"), "{}", last_error());

    // A label outside the declared classes (0..2) is refused when added.
    let mut ds2: *mut sfr_dataset = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_dataset_new(classes.as_ptr(), &mut ds2) }, SFR_OK);
    let img = vec![1.0f32; 8 * 8 * 8];
    let mut lab = vec![0u8; 8 * 8 * 8];
    lab[100] = 3;
    let (vi, vl) = (view(&img, sfr_dtype::SFR_DTYPE_F32, [8; 3]), view(&lab, sfr_dtype::SFR_DTYPE_U8, [8; 3]));
    assert_eq!(unsafe { sfr_dataset_add_labeled(ds2, std::ptr::null(), &vi, &vl) }, SFR_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("label value 3 is outside the declared classes 0..2"), "{}", last_error());
    lab[100] = 2;
    assert_eq!(unsafe { sfr_dataset_add_labeled(ds2, std::ptr::null(), &vi, &vl) }, SFR_OK);
    assert_eq!(unsafe { sfr_dataset_counts(ds2, &mut l, std::ptr::null_mut()) }, SFR_OK);
    assert_eq!(l, 1);
    unsafe { sfr_dataset_free(ds2) };
}

mod fuzz {
    //! Arbitrary input through the boundary: every call must come back with a status (never a
    //! panic, an abort or a read outside the buffers it was given).
    use super::*;
    use proptest::prelude::*;

    fn json_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            // Mutations of real configs reach deeper into the parser and the validation.
            (
                prop::sample::select(vec!["test-tiny", "cpu-small", "paper-la", "x", ""]),
                prop::sample::select(vec!["vnet", "sam", "inference", "patch", "bogus", "sfr_plus", "threads"]),
                prop::sample::select(vec!["0", "-1", "1e308", "[16,16,16]", "[0,0,0]", "{}", "{\"iterations\":0}", "null", "\"s\"", "true"]),
            )
                .prop_map(|(p, k, v)| format!("{{\"preset\": \"{p}\", \"{k}\": {v}}}")),
            "[{}\\[\\]\":,0-9a-z ]{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn json_never_panics(text in json_like()) {
            let Ok(c) = CString::new(text) else { return Ok(()) };
            let mut ds: *mut sfr_dataset = std::ptr::null_mut();
            let st = unsafe { sfr_dataset_new(c.as_ptr(), &mut ds) };
            prop_assert!(st == SFR_OK || st == SFR_ERR_INVALID_ARGUMENT, "{st:?}: {}", last_error());
            unsafe { sfr_dataset_free(ds) };
            // An empty dataset: the config is parsed and checked, but no job can start.
            let classes = CString::new(r#"{"0": "b", "1": "f"}"#).unwrap();
            let mut empty: *mut sfr_dataset = std::ptr::null_mut();
            prop_assert_eq!(unsafe { sfr_dataset_new(classes.as_ptr(), &mut empty) }, SFR_OK);
            let mut job: *mut sfr_job = std::ptr::null_mut();
            let st = unsafe { sfr_train_start(empty, c.as_ptr(), &mut job) };
            prop_assert_eq!(st, SFR_ERR_INVALID_ARGUMENT, "{}", last_error());
            prop_assert!(job.is_null());
            unsafe { sfr_dataset_free(empty) };
        }
    }

    #[test]
    fn views_never_panic() {
        use proptest::test_runner::{Config, TestRunner};
        let strategy = (
            prop::array::uniform3(0usize..12),
            -2i32..10,
            0usize..=4096,
            prop::array::uniform9(prop_oneof![Just(0.0), Just(1.0), Just(-1.0), Just(f64::NAN), -2.0..2.0f64]),
            prop::array::uniform3(prop_oneof![Just(1.0), Just(0.0), Just(f64::INFINITY), 0.1..3.0f64]),
            0usize..64,
            0usize..5000,
        );
        let ok = std::cell::Cell::new(0usize);
        let mut runner = TestRunner::new(Config { cases: 500, failure_persistence: None, ..Config::default() });
        runner
            .run(&strategy, |(dims, dtype, len, geo, spacing, canvas, out_len)| {
                let buf = vec![0x41u8; 4096]; // non-zero as every dtype, f64 cast to f32 included
                // Half the cases get a consistent length, geometry and output buffer, so that
                // valid views (and the stitching behind them) are reached too.
                let size = [1usize, 1, 2, 2, 4, 4, 4, 8].get(dtype as usize).copied().unwrap_or(1);
                let need = dims.iter().product::<usize>() * size;
                let consistent = len % 2 == 0;
                let data_len = if consistent { need.min(4096) } else { len };
                let direction = if consistent { [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0] } else { geo };
                let (spacing, origin, out_len) = if consistent { ([1.0, 2.0, 0.5], [geo[1], -3.0, 4.0], 5000) } else { (spacing, [geo[0], 0.0, 0.0], out_len) };
                let v = sfr_volume_view { data: buf.as_ptr() as *const _, data_len, dtype, dims, spacing, origin, direction };
                let mut out = vec![-1f32; 5000];
                let st = unsafe { sfr_stitch_image(&v, canvas, out.as_mut_ptr(), out_len) };
                prop_assert!(st == SFR_OK || st == SFR_ERR_INVALID_ARGUMENT || st == SFR_ERR_BUFFER_TOO_SMALL, "{st:?}: {}", last_error());
                if st == SFR_OK {
                    ok.set(ok.get() + 1);
                    // Every voxel holds the same non-zero value: exactly one canvas pixel per
                    // voxel has it, the rest is padding (0).
                    let canvas_px = &out[..canvas * canvas];
                    let value = canvas_px.iter().copied().find(|&x| x != 0.0);
                    prop_assert!(value.is_some());
                    prop_assert_eq!(canvas_px.iter().filter(|&&x| x != 0.0).count(), dims.iter().product::<usize>());
                    prop_assert!(canvas_px.iter().all(|&x| x == 0.0 || Some(x) == value));
                    prop_assert!(out[canvas * canvas..].iter().all(|&x| x == -1.0), "wrote past canvas*canvas");
                } else {
                    prop_assert!(out.iter().all(|&x| x == -1.0), "an output was written on failure");
                }
                Ok(())
            })
            .unwrap();
        assert!(ok.get() > 10, "only {} valid views were generated: the strategy misses the success path", ok.get());
    }
}
