//! A training that leaves a class unlearnt says so, everywhere a model is handed over: the
//! CLI warns with the class's name and exits with status 3 (0 with `--allow-weak`), the model
//! file records the per-class check, the C ABI reports the failed classes and the warning, and
//! segmenting with such a model warns again.
//!
//! The provocation: phantoms whose class 2 is replaced by voxels scattered at random, with no
//! trace in the image — nothing a network can learn, so the check must fail it — while class 1
//! (the organ) stays learnable.
use sfr::ffi::*;
use sfr::io::nifti;
use sfr::phantom::{write_dataset, PhantomSpec};
use sfr::volume::Volume;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::process::{Command, Output};

fn sfr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sfr")).env("RUST_LOG", "warn").args(args).output().expect("start sfr")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Phantoms with a learnable class 1 and an unlearnable class 2 (1 voxel in 50, at random).
fn unlearnable_class_dataset(dir: &Path) {
    let spec = PhantomSpec { dims: [32, 32, 16], num_classes: 3, noise: 0.3 };
    write_dataset(dir, 3, &spec, 11).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for c in 0..3 {
        let p = dir.join("labelsTr").join(format!("phantom_{c:03}.nii.gz"));
        let lab = nifti::read(&p).unwrap().cast::<u8>();
        let data = lab.data.mapv(|v| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match (v, state % 50) {
                (0, 0) => 2,
                (2, _) => 1,
                (v, _) => v,
            }
        });
        nifti::write(&p, &Volume::new(data, lab.geometry)).unwrap();
    }
}

#[test]
fn an_unlearnt_class_is_named_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    unlearnable_class_dataset(&data);
    let model = dir.path().join("weak.sfrmodel");
    let (d, m) = (data.to_str().unwrap(), model.to_str().unwrap());
    let args = ["train", "--data", d, "--labeled", "2", "--preset", "test-tiny", "--method", "supervised", "--no-sam", "--progress", "none", "--out", m];
    let o = sfr(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "a failed class must fail the run: {err}");
    assert!(err.contains("WARNING: training failed: class 2 'bud' is"), "{err}");
    assert!(err.contains("Try another seed"), "{err}");
    assert!(err.contains("--allow-weak"), "{err}");
    assert!(model.exists(), "the model is kept for inspection");

    // The record in the model file.
    let info = sfr(&["info", m]);
    let meta: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let check = &meta["training"]["class_check"];
    assert_eq!(check["judged_on"], "fit", "{check}");
    let verdict = |c: u64| check["classes"].as_array().unwrap().iter().find(|v| v["class"] == c).unwrap()["verdict"].clone();
    assert!(verdict(2) == "never_predicted" || verdict(2) == "far_below", "{check}");

    // Using it warns again.
    let img = data.join("imagesTr").join("phantom_002.nii.gz");
    let seg = dir.path().join("seg.nii.gz");
    let o = sfr(&["segment", "--model", m, "--input", img.to_str().unwrap(), "--output", seg.to_str().unwrap(), "--progress", "none"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("WARNING") && stderr(&o).contains("'bud'"), "{}", stderr(&o));

    // The C ABI reports it.
    let path = CString::new(m).unwrap();
    let mut h: *mut sfr_model = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_model_load(path.as_ptr(), c"cpu".as_ptr(), &mut h) }, SFR_OK);
    let mut failed = 0usize;
    assert_eq!(unsafe { sfr_model_failed_classes(h, &mut failed) }, SFR_OK);
    assert!(failed >= 1);
    let mut needed = 0usize;
    assert_eq!(unsafe { sfr_model_check_message(h, std::ptr::null_mut(), 0, &mut needed) }, SFR_ERR_BUFFER_TOO_SMALL);
    let mut buf = vec![0 as c_char; needed];
    assert_eq!(unsafe { sfr_model_check_message(h, buf.as_mut_ptr(), needed, &mut needed) }, SFR_OK);
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(msg.contains("'bud'"), "{msg}");
    assert_eq!(unsafe { sfr_model_failed_classes(h, std::ptr::null_mut()) }, SFR_ERR_NULL_POINTER);
    unsafe { sfr_model_free(h) };

    // --allow-weak keeps it with status 0, and still warns.
    let o = sfr(&[&args[..], &["--allow-weak"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("WARNING: training failed"), "{}", stderr(&o));
}
