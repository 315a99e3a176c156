//! Reliability (issue 14): every input, configuration, model file and signal gets a clear
//! answer, nothing is lost, nothing is killed.
//!
//! * A corpus of damaged NIfTI files, generated here (never committed), goes through the
//!   library, `sfr info`, `convert`, `segment` and `evaluate`: each run ends with a clear error
//!   naming the file (or, for the few damages that nifti1_io tolerates, a valid result), never
//!   a panic or a signal.
//! * Damaged volumes and tampered or broken model files go through the C ABI: an error status
//!   and message, never SFR_ERR_PANIC, never an abort on a huge allocation.
//! * Outputs: an output that is an input is refused, a failed run leaves an existing output
//!   intact, a missing or read-only output folder is an error before any work.
//! * Configuration bounds are checked before any work; a closed stdout or a full disk does
//!   not panic; cancelling during pseudo-labelling takes seconds.
mod common;

use sfr::ffi::*;
use sfr::infer::Weighting;
use sfr::io::nifti;
use sfr::job::{Job, Reporter};
use sfr::model::{ModelMeta, SfrModel, FORMAT, FORMAT_VERSION};
use sfr::nn::vnet::{VNet, VNetConfig};
use sfr::phantom::{phantom, write_dataset, PhantomSpec};
use sfr::pipeline::config::{InferenceConfig, TrainConfig};
use sfr::pipeline::{train, RunOptions, TrainInputs};
use sfr::volume::{Geometry, Volume};
use std::ffi::{c_char, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sfr_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sfr"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    sfr_bin().args(args).output().expect("start sfr")
}

/// `run` with the stage log on stderr, to see which stages ran.
fn run_logged(args: &[&str]) -> Output {
    sfr_bin().env("RUST_LOG", "info").args(args).output().expect("start sfr")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: exit status 1 (not a signal, not a panic's 101), no panic message, an
/// error that names `file`.
fn assert_clean_failure(o: &Output, file: &str, what: &str) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{what}: panic: {err}");
    assert_eq!(o.status.code(), Some(1), "{what}: status {:?}, stderr: {err}", o.status);
    assert!(err.contains("error: "), "{what}: no error line: {err}");
    assert!(err.contains(file), "{what}: the error does not name {file}: {err}");
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tiny model and data

fn tiny_model() -> SfrModel {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = VNetConfig { n_filters: 2, num_classes: 2, ..VNetConfig::default() };
    let net = VNet::new(&vs.root(), &cfg).unwrap();
    let meta = ModelMeta {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: sfr::VERSION.into(),
        classes: sfr::limits::Classes::new("classes", [(0, "background".into()), (1, "organ".into())].into()).unwrap(),
        patch: [16, 16, 16],
        normalization: "zscore-per-volume".into(),
        normalization_window: None,
        spacing: [1.0, 1.0, 1.0],
        vnet: cfg,
        inference: InferenceConfig { stride: [16, 16, 16], weighting: Weighting::Mean, batch: 2 },
        training: serde_json::json!({"method": "supervised"}),
        validation: None,
        created_unix: 0,
    };
    SfrModel::new(vs, net, meta)
}

fn write_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.sfrmodel");
    tiny_model().save(&p).unwrap();
    p
}

/// A copy of a model file whose `sfr` metadata went through `f` (the weights unchanged).
fn tampered(model: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let bytes = std::fs::read(model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(header["__metadata__"]["sfr"].as_str().unwrap()).unwrap();
    f(&mut meta);
    header["__metadata__"]["sfr"] = serde_json::Value::String(meta.to_string());
    let mut h = header.to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    out
}

fn small_volume() -> Volume<f32> {
    let g = Geometry { origin: [3.0, -2.0, 1.0], spacing: [0.8, 0.9, 1.5], ..Geometry::default() };
    Volume::new(ndarray::Array3::from_shape_fn((8, 10, 12), |(k, j, i)| (i * 3 + j * 5 + k * 7) as f32 * 0.25 - 4.0), g)
}

// ---------------------------------------------------------------------------------------------
// The corpus of damaged NIfTI files

/// Offsets in a NIfTI-1 header.
const DIM: usize = 40;
const DATATYPE: usize = 70;
const BITPIX: usize = 72;
const PIXDIM: usize = 76;
const VOX_OFFSET: usize = 108;
const QFORM_CODE: usize = 252;
const SFORM_CODE: usize = 254;
const SROW_X: usize = 280;
const MAGIC: usize = 344;

fn put_i16(b: &mut [u8], off: usize, v: i16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_i32(b: &mut [u8], off: usize, v: i32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_f32(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// What a damaged file must give.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// An error (naming the file) everywhere.
    Error,
    /// nifti1_io and ITK accept it (e.g. pixdim 0 means spacing 1): a valid volume or a clear
    /// error are both answers; a panic or a signal is not.
    Tolerated,
}

/// (file name, bytes or None for a folder, expectation). File names are unique per case so that
/// every error can be checked to name its file.
fn corpus() -> Vec<(String, Option<Vec<u8>>, Expect)> {
    use Expect::*;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.nii");
    nifti::write(&p, &small_volume()).unwrap();
    let good = std::fs::read(&p).unwrap();
    let mut c: Vec<(String, Option<Vec<u8>>, Expect)> = vec![];
    let mut add = |name: &str, bytes: Vec<u8>, e: Expect| c.push((name.to_string(), Some(bytes), e));
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };

    add("empty.nii", vec![], Error);
    for cut in [1, 100, 347, 348, 351, 352, 353, 352 + 480, good.len() - 1] {
        add(&format!("cut{cut}.nii"), good[..cut].to_vec(), Error);
    }
    add("sizeof_hdr.nii", with(&|b| put_i32(b, 0, 123)), Error);
    add("sizeof_hdr_nifti2.nii", with(&|b| put_i32(b, 0, 540)), Error);
    add("magic.nii", with(&|b| b[MAGIC..MAGIC + 4].copy_from_slice(b"abc\0")), Error);
    add("magic_pair.nii", with(&|b| b[MAGIC..MAGIC + 4].copy_from_slice(b"ni1\0")), Error);
    add("dim0_zero.nii", with(&|b| put_i16(b, DIM, 0)), Error);
    add("dim0_eight.nii", with(&|b| put_i16(b, DIM, 8)), Error);
    add("dim0_negative.nii", with(&|b| put_i16(b, DIM, -3)), Error);
    add("dim_zero.nii", with(&|b| put_i16(b, DIM + 4, 0)), Error);
    add("dim_negative.nii", with(&|b| put_i16(b, DIM + 2, -12)), Error);
    add(
        "dims_overflow.nii",
        with(&|b| {
            for a in 1..=3 {
                put_i16(b, DIM + 2 * a, i16::MAX);
            }
        }),
        Error,
    );
    add(
        "dims_lie.nii",
        with(&|b| {
            for a in 1..=3 {
                put_i16(b, DIM + 2 * a, 1000);
            }
        }),
        Error,
    );
    add(
        "four_d.nii",
        with(&|b| {
            put_i16(b, DIM, 4);
            put_i16(b, DIM + 8, 2);
        }),
        Error,
    );
    add(
        "five_d.nii",
        with(&|b| {
            put_i16(b, DIM, 5);
            put_i16(b, DIM + 10, 3);
        }),
        Error,
    );
    add("vox_offset_far.nii", with(&|b| put_f32(b, VOX_OFFSET, 1e9)), Error);
    add("vox_offset_end.nii", with(&|b| put_f32(b, VOX_OFFSET, good.len() as f32)), Error);
    add("vox_offset_small.nii", with(&|b| put_f32(b, VOX_OFFSET, 10.0)), Error);
    add("vox_offset_nan.nii", with(&|b| put_f32(b, VOX_OFFSET, f32::NAN)), Error);
    for (code, bits) in [(1i16, 1i16), (32, 64), (128, 24), (1024, 64), (1536, 128), (2304, 32), (77, 8)] {
        add(
            &format!("datatype{code}.nii"),
            with(&|b| {
                put_i16(b, DATATYPE, code);
                put_i16(b, BITPIX, bits);
            }),
            Error,
        );
    }
    add("bitpix.nii", with(&|b| put_i16(b, BITPIX, 8)), Error);
    // pixdim 0 / NaN with neither sform nor qform: nifti1_io takes spacing 1
    let no_affine = |b: &mut Vec<u8>| {
        put_i16(b, QFORM_CODE, 0);
        put_i16(b, SFORM_CODE, 0);
    };
    add(
        "pixdim_zero.nii",
        with(&|b| {
            no_affine(b);
            put_f32(b, PIXDIM + 4, 0.0);
        }),
        Tolerated,
    );
    add(
        "pixdim_nan.nii",
        with(&|b| {
            no_affine(b);
            put_f32(b, PIXDIM + 8, f32::NAN);
        }),
        Tolerated,
    );
    add(
        "pixdim_zero_qform.nii",
        with(&|b| {
            put_i16(b, SFORM_CODE, 0);
            put_f32(b, PIXDIM + 4, 0.0);
        }),
        Tolerated,
    );
    add(
        "sform_singular.nii",
        with(&|b| {
            for k in 0..12 {
                put_f32(b, SROW_X + 4 * k, 0.0);
            }
        }),
        Error,
    );
    add(
        "sform_rank2.nii",
        with(&|b| {
            // column 2 equal to column 0: two voxel axes point the same way
            for r in 0..3 {
                let v = f32::from_le_bytes(b[SROW_X + 16 * r..SROW_X + 16 * r + 4].try_into().unwrap());
                put_f32(b, SROW_X + 16 * r + 8, v);
            }
        }),
        Error,
    );
    add("sform_nan.nii", with(&|b| put_f32(b, SROW_X + 4, f32::NAN)), Error);

    // gzip damages
    let gz = gzip(&good);
    let n = gz.len();
    add("gz_cut_half.nii.gz", gz[..n / 2].to_vec(), Error);
    add("gz_cut_trailer.nii.gz", gz[..n - 4].to_vec(), Error);
    add("gz_cut_header.nii.gz", gz[..5].to_vec(), Error);
    let flip = |range: std::ops::Range<usize>| {
        let mut b = gz.clone();
        for x in &mut b[range] {
            *x ^= 0x5a;
        }
        b
    };
    add("gz_crc.nii.gz", flip(n - 8..n - 7), Error);
    add("gz_isize.nii.gz", flip(n - 3..n - 2), Error);
    add("gz_deflate.nii.gz", flip(n / 2..n / 2 + 3), Error);
    let mut trailing = gz.clone();
    trailing.extend(b"garbage after the gzip member");
    add("gz_trailing.nii.gz", trailing, Error);
    add("gz_header_damage.nii.gz", gzip(&with(&|b| put_i16(b, DIM, 9))), Error);
    // a plain .nii under a .gz name is fine: gzip is detected by its magic bytes
    add("plain_named_gz.nii.gz", good.clone(), Tolerated);
    c.push(("folder.nii.gz".into(), None, Error));
    c
}

fn materialise(dir: &Path, corpus: &[(String, Option<Vec<u8>>, Expect)]) -> Vec<(PathBuf, Expect)> {
    corpus
        .iter()
        .map(|(name, bytes, e)| {
            let p = dir.join(name);
            match bytes {
                Some(b) => std::fs::write(&p, b).unwrap(),
                None => std::fs::create_dir(&p).unwrap(),
            }
            (p, *e)
        })
        .collect()
}

/// Runs `jobs` on a few threads (the CLI runs are independent processes).
fn parallel<T: Send>(jobs: Vec<T>, f: impl Fn(T) + Sync) {
    let jobs = std::sync::Mutex::new(jobs);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some(j) = jobs.lock().unwrap().pop() else { break };
                f(j);
            });
        }
    });
}

#[test]
fn damaged_nifti_corpus_through_library_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let files = materialise(dir.path(), &corpus());
    let model = write_model(dir.path());

    // The library: an error naming the file, or (tolerated damages) a sane volume.
    for (p, e) in &files {
        let name = file_name(p);
        match (nifti::read(p), e) {
            (Err(err), _) => assert!(err.to_string().contains(&name), "{name}: error does not name the file: {err}"),
            (Ok(_), Expect::Error) => panic!("{name}: a damaged file was read as valid"),
            (Ok(v), Expect::Tolerated) => {
                let g = v.geometry();
                assert!(g.spacing.iter().all(|s| s.is_finite() && *s > 0.0), "{name}: spacing {:?}", g.spacing);
            }
        }
    }
    // The corrupt gzip files in particular must name the damage.
    for n in ["gz_crc.nii.gz", "gz_isize.nii.gz", "gz_trailing.nii.gz", "gz_cut_trailer.nii.gz"] {
        let e = nifti::read(dir.path().join(n)).unwrap_err().to_string();
        assert!(e.contains("corrupt") || e.contains("truncated"), "{n}: {e}");
    }

    // The CLI: each command on files of every kind of damage, on a few threads. (Every start
    // of `sfr` loads libtorch, about a second of CPU: the whole corpus goes through the
    // library above, the command-line error path through a sample of each damage.)
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let sample: [(&str, &[&str]); 4] = [
        ("info", &["empty.nii", "cut351.nii", "dims_overflow.nii", "datatype32.nii", "gz_crc.nii.gz", "folder.nii.gz", "four_d.nii", "sform_singular.nii", "pixdim_zero.nii"]),
        ("convert", &["magic.nii", "vox_offset_far.nii", "gz_trailing.nii.gz", "pixdim_nan.nii"]),
        ("segment", &["dim0_negative.nii", "gz_deflate.nii.gz", "cut1.nii", "folder.nii.gz"]),
        ("evaluate", &["dims_lie.nii", "gz_isize.nii.gz", "bitpix.nii"]),
    ];
    let mut jobs = vec![];
    for (cmd, names) in sample {
        for n in names {
            let i = files.iter().position(|(p, _)| file_name(p) == *n).unwrap_or_else(|| panic!("{n} is not in the corpus"));
            jobs.push((i, files[i].0.clone(), files[i].1, cmd));
        }
    }
    let runs = jobs.len();
    let t = Instant::now();
    parallel(jobs, |(i, p, e, cmd)| {
        let name = file_name(&p);
        let ps = p.to_str().unwrap();
        let out = out_dir.join(format!("o{i}_{cmd}.nii.gz"));
        let o = match cmd {
            "info" => run(&["info", ps]),
            "convert" => run(&["convert", ps, out.to_str().unwrap()]),
            "segment" => run(&["segment", "--model", model.to_str().unwrap(), "--input", ps, "--output", out.to_str().unwrap(), "--progress", "none", "--device", "cpu"]),
            _ => {
                // a one-case dataset whose image is the damaged file (its label is valid)
                let d = dir.path().join(format!("ds{i}"));
                std::fs::create_dir_all(d.join("imagesTr")).unwrap();
                std::fs::create_dir_all(d.join("labelsTr")).unwrap();
                let img = d.join("imagesTr").join(&name);
                if p.is_dir() {
                    std::fs::create_dir(&img).unwrap();
                } else {
                    std::fs::copy(&p, &img).unwrap();
                }
                let lab = d.join("labelsTr/label.nii.gz");
                nifti::write(&lab, &Volume::new(ndarray::Array3::<u8>::zeros((8, 10, 12)), small_volume().geometry)).unwrap();
                let j = serde_json::json!({"name": "x", "labels": {"0": "bg", "1": "organ"},
                    "training": [{"image": format!("./imagesTr/{name}"), "label": "./labelsTr/label.nii.gz"}]});
                std::fs::write(d.join("dataset.json"), j.to_string()).unwrap();
                run(&["evaluate", "--model", model.to_str().unwrap(), "--data", d.to_str().unwrap(), "--device", "cpu"])
            }
        };
        let what = format!("sfr {cmd} {name}");
        if o.status.success() {
            assert_eq!(e, Expect::Tolerated, "{what}: a damaged file was accepted: {}", stderr(&o));
            assert!(!stderr(&o).contains("panicked"), "{what}");
        } else if e == Expect::Tolerated && cmd == "evaluate" {
            // e.g. pixdim 0 (spacing 1) no longer matches the label's geometry: a clear error
            assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
            assert!(!stderr(&o).contains("panicked"), "{what}");
        } else {
            assert_clean_failure(&o, &name, &what);
            assert!(!out.exists(), "{what}: an output was written");
        }
    });
    eprintln!("{} damaged files through the library, {runs} CLI runs in {:.1} s", files.len(), t.elapsed().as_secs_f64());
    // no temporary file was left behind by any failed write
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn gzip_crc_and_deflate_damage_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.nii.gz");
    // 62,475 voxels as in the report, with content that compresses to real Huffman blocks
    let v = Volume::new(ndarray::Array3::<f32>::from_shape_fn((35, 35, 51), |(k, j, i)| ((i * 7 + j * 13 + k * 29) % 97) as f32), Geometry::default());
    nifti::write(&p, &v).unwrap();
    let gz = std::fs::read(&p).unwrap();
    assert!(nifti::read(&p).is_ok());
    let n = gz.len();
    // Damaged deflate data at many places: every one is an error (a decoder that stops at the
    // voxels' end, never checking the CRC, accepted many of these with wrong voxels).
    let mut accepted = vec![];
    for (t, at) in (40..n - 8).step_by((n - 48) / 25).enumerate() {
        let mut b = gz.clone();
        b[at] ^= 0x10;
        let q = dir.path().join(format!("d{t}.nii.gz"));
        std::fs::write(&q, &b).unwrap();
        match nifti::read(&q) {
            Ok(back) => {
                let same = back.cast::<f32>().data == v.data;
                accepted.push((at, same));
            }
            Err(e) => assert!(e.to_string().contains(&format!("d{t}.nii.gz")), "{e}"),
        }
    }
    assert!(accepted.is_empty(), "damaged deflate data read as valid at (offset, voxels intact): {accepted:?}");
    // CRC-32 and ISIZE (the last 8 bytes)
    for (name, at) in [("crc.nii.gz", n - 8), ("crc2.nii.gz", n - 5), ("isize.nii.gz", n - 4)] {
        let mut b = gz.clone();
        b[at] ^= 0x01;
        let q = dir.path().join(name);
        std::fs::write(&q, &b).unwrap();
        let e = nifti::read(&q).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("corrupt"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The C ABI

fn last_error() -> String {
    let n = unsafe { sfr_last_error_message(std::ptr::null_mut(), 0) };
    let mut buf = vec![0 as c_char; n];
    unsafe { sfr_last_error_message(buf.as_mut_ptr(), n) };
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

fn view(data: &[f32], dims: [usize; 3]) -> sfr_volume_view {
    sfr_volume_view {
        data: data.as_ptr() as *const _,
        data_len: std::mem::size_of_val(data),
        dtype: sfr_dtype::SFR_DTYPE_F32 as i32,
        dims,
        spacing: [1.0; 3],
        origin: [0.0; 3],
        direction: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    }
}

/// A failing C call: an error status (never OK, never a caught panic) and a message.
fn assert_c_error(st: sfr_status, what: &str, needle: &str) {
    let msg = last_error();
    assert_ne!(st, SFR_OK, "{what}: accepted");
    assert_ne!(st, SFR_ERR_PANIC, "{what}: panic: {msg}");
    assert!(msg.contains(needle), "{what}: message '{msg}' lacks '{needle}'");
}

#[test]
fn damaged_volumes_and_models_through_the_c_abi() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = write_model(dir.path());
    let cpath = |p: &Path| CString::new(p.to_str().unwrap()).unwrap();
    let mut model: *mut sfr_model = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_model_load(cpath(&model_path).as_ptr(), c"cpu".as_ptr(), &mut model) }, SFR_OK, "{}", last_error());

    // Volumes with the damages of the NIfTI corpus, as a C caller can pass them.
    let data = vec![0.5f32; 12 * 10 * 8];
    let good = view(&data, [12, 10, 8]);
    let mut cases: Vec<(&str, sfr_volume_view, &str)> = vec![];
    cases.push(("dims 0", sfr_volume_view { dims: [0, 10, 8], data_len: 0, ..good }, "dims"));
    cases.push(("dims overflow", sfr_volume_view { dims: [usize::MAX, usize::MAX, 2], ..good }, "too large"));
    cases.push(("dims lie", sfr_volume_view { dims: [2000, 2000, 2000], ..good }, "data_len"));
    cases.push(("short buffer", sfr_volume_view { data_len: 100, ..good }, "data_len"));
    cases.push(("dtype", sfr_volume_view { dtype: 99, ..good }, "dtype"));
    cases.push(("dtype negative", sfr_volume_view { dtype: -1, ..good }, "dtype"));
    cases.push(("null data", sfr_volume_view { data: std::ptr::null(), ..good }, "NULL"));
    cases.push(("spacing 0", sfr_volume_view { spacing: [1.0, 0.0, 1.0], ..good }, "spacing"));
    cases.push(("spacing NaN", sfr_volume_view { spacing: [f64::NAN, 1.0, 1.0], ..good }, "spacing"));
    cases.push(("spacing negative", sfr_volume_view { spacing: [1.0, 1.0, -2.0], ..good }, "spacing"));
    cases.push(("origin inf", sfr_volume_view { origin: [f64::INFINITY, 0.0, 0.0], ..good }, "origin"));
    cases.push(("direction singular", sfr_volume_view { direction: [0.0; 9], ..good }, "direction"));
    cases.push(("direction sheared", sfr_volume_view { direction: [1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], ..good }, "direction"));
    let mut labels = vec![0u8; data.len()];
    let mut ds: *mut sfr_dataset = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_dataset_new(c"{\"0\": \"bg\", \"1\": \"organ\"}".as_ptr(), &mut ds) }, SFR_OK);
    let mut canvas = vec![0f32; 256 * 256];
    for (what, v, needle) in &cases {
        let st = unsafe { sfr_segment(model, v, sfr_dtype::SFR_DTYPE_U8 as i32, labels.as_mut_ptr() as *mut _, labels.len(), std::ptr::null_mut(), 0) };
        assert_c_error(st, &format!("sfr_segment: {what}"), needle);
        assert!(labels.iter().all(|&l| l == 0), "{what}: output written on failure");
        let mut job: *mut sfr_job = std::ptr::null_mut();
        assert_c_error(unsafe { sfr_segment_start(model, v, &mut job) }, &format!("sfr_segment_start: {what}"), needle);
        assert!(job.is_null());
        assert_c_error(unsafe { sfr_dataset_add_unlabeled(ds, std::ptr::null(), v) }, &format!("sfr_dataset_add_unlabeled: {what}"), needle);
        let lv = sfr_volume_view { dtype: sfr_dtype::SFR_DTYPE_U8 as i32, data: labels.as_ptr() as *const _, data_len: labels.len(), ..*v };
        assert_c_error(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), v, &lv) }, &format!("sfr_dataset_add_labeled: {what}"), needle);
        assert_c_error(unsafe { sfr_stitch_image(v, 256, canvas.as_mut_ptr(), canvas.len()) }, &format!("sfr_stitch_image: {what}"), needle);
    }
    let (mut nl, mut nu) = (9, 9);
    assert_eq!(unsafe { sfr_dataset_counts(ds, &mut nl, &mut nu) }, SFR_OK);
    assert_eq!((nl, nu), (0, 0), "no bad case was added");

    // Broken and tampered model files: refused at load, the file named, nothing allocated.
    let good_bytes = std::fs::read(&model_path).unwrap();
    let mut models: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "too short"),
        ("garbage", b"this is not a model at all".to_vec(), "not an SFR model"),
        ("cut", good_bytes[..good_bytes.len() / 2].to_vec(), "truncated"),
        ("header_len", { let mut b = good_bytes.clone(); b[..8].copy_from_slice(&u64::MAX.to_le_bytes()); b }, "header"),
        ("patch4096", tampered(&model_path, |m| m["patch"] = serde_json::json!([4096, 4096, 4096])), "patch"),
        ("patch_odd", tampered(&model_path, |m| m["patch"] = serde_json::json!([17, 16, 16])), "patch"),
        ("n_filters", tampered(&model_path, |m| m["vnet"]["n_filters"] = serde_json::json!(100000)), "n_filters"),
        ("n_filters0", tampered(&model_path, |m| m["vnet"]["n_filters"] = serde_json::json!(0)), "n_filters"),
        ("num_classes", tampered(&model_path, |m| m["vnet"]["num_classes"] = serde_json::json!(3)), "num_classes"),
        ("class_gap", tampered(&model_path, |m| m["classes"] = serde_json::json!({"0": "bg", "2": "x"})), "1 is missing"),
        ("stride0", tampered(&model_path, |m| m["inference"]["stride"] = serde_json::json!([0, 16, 16])), "stride"),
        ("batch", tampered(&model_path, |m| m["inference"]["batch"] = serde_json::json!(100000)), "inference.batch"),
        ("spacing", tampered(&model_path, |m| m["spacing"] = serde_json::json!([1.0, 0.0, 1.0])), "spacing"),
        ("format", tampered(&model_path, |m| m["format_version"] = serde_json::json!(99)), "v99"),
        ("unknown_key", tampered(&model_path, |m| m["surprise"] = serde_json::json!(1)), "surprise"),
    ];
    let folder = dir.path().join("folder.sfrmodel");
    std::fs::create_dir(&folder).unwrap();
    for (name, bytes, needle) in models.drain(..) {
        let p = dir.path().join(format!("{name}.sfrmodel"));
        std::fs::write(&p, &bytes).unwrap();
        let mut m: *mut sfr_model = std::ptr::null_mut();
        let t = Instant::now();
        let st = unsafe { sfr_model_load(cpath(&p).as_ptr(), c"cpu".as_ptr(), &mut m) };
        assert_c_error(st, &format!("sfr_model_load {name}"), needle);
        assert!(last_error().contains(&format!("{name}.sfrmodel")), "{name}: {}", last_error());
        assert!(m.is_null());
        assert!(t.elapsed() < Duration::from_secs(5), "{name}: took {:?}", t.elapsed());
        // and the CLI says the same (a sample: each run loads libtorch)
        if ["cut", "patch4096", "garbage"].contains(&name) {
            let o = run(&["info", p.to_str().unwrap()]);
            assert_clean_failure(&o, &format!("{name}.sfrmodel"), &format!("sfr info {name}"));
        }
    }
    let mut m: *mut sfr_model = std::ptr::null_mut();
    assert_c_error(unsafe { sfr_model_load(cpath(&folder).as_ptr(), c"cpu".as_ptr(), &mut m) }, "model folder", "folder");
    unsafe {
        sfr_dataset_free(ds);
        sfr_model_free(model);
    }
}

#[test]
fn bad_configs_are_refused_before_any_work_everywhere() {
    // The C ABI (and so the Slicer module): refused by sfr_train_start itself, no job started.
    let mut ds: *mut sfr_dataset = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_dataset_new(c"{\"0\": \"bg\", \"1\": \"organ\"}".as_ptr(), &mut ds) }, SFR_OK);
    let (img, lab) = phantom(1, &PhantomSpec { dims: [16, 16, 16], num_classes: 2, noise: 0.3 });
    let iv = view(img.data.as_slice().unwrap(), [16, 16, 16]);
    let lv = sfr_volume_view { dtype: sfr_dtype::SFR_DTYPE_U8 as i32, data: lab.data.as_ptr() as *const _, data_len: lab.data.len(), ..iv };
    for _ in 0..2 {
        assert_eq!(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), &iv, &lv) }, SFR_OK, "{}", last_error());
    }
    let bad = [
        (r#"{"preset": "test-tiny", "threads": 512}"#, "threads"),
        (r#"{"preset": "test-tiny", "sam": {"image_size": 100000}}"#, "sam.image_size"),
        (r#"{"preset": "test-tiny", "vnet": {"labeled_batch": 100000}}"#, "vnet.labeled_batch"),
        (r#"{"preset": "test-tiny", "vnet": {"lr": -0.01}}"#, "vnet.lr"),
        (r#"{"preset": "test-tiny", "sam": {"lr": 0}}"#, "sam.lr"),
        (r#"{"preset": "test-tiny", "vnet": {"n_filters": 0}}"#, "vnet.n_filters"),
        (r#"{"preset": "test-tiny", "sam": {"lora_rank": 0}}"#, "sam.lora_rank"),
        (r#"{"preset": "test-tiny", "vnet": {"iterations": 0}}"#, "vnet.iterations"),
        (r#"{"preset": "test-tiny", "patch": [4096, 4096, 4096]}"#, "patch"),
        (r#"{"preset": "test-tiny", "vnet": {"iterations_per_epoch": 0}}"#, "iterations_per_epoch"),
        (r#"{"preset": "test-tiny", "vnet": {"weight_decay": -1}}"#, "weight_decay"),
        (r#"{"preset": "test-tiny", "inference": {"batch": 1000}}"#, "inference.batch"),
        (r#"{"preset": "test-tiny", "sam": {"variant": "vit_z"}}"#, "vit_z"),
        (r#"{"preset": "test-tiny", "sam": {"checkpoint": "/nonexistent/sam.pth"}}"#, "/nonexistent/sam.pth"),
        (r#"{"preset": "test-tiny", "sfr_plus": {"rounds": 0}}"#, "sfr_plus.rounds"),
        (r#"{"preset": "test-tiny", "validation_cases": 2}"#, "validation_cases 2"),
    ];
    for (json, needle) in bad {
        let c = CString::new(json).unwrap();
        let mut job: *mut sfr_job = std::ptr::null_mut();
        let t = Instant::now();
        let st = unsafe { sfr_train_start(ds, c.as_ptr(), &mut job) };
        assert_eq!(st, SFR_ERR_INVALID_ARGUMENT, "{json}: {}", last_error());
        assert!(last_error().contains(needle), "{json}: {}", last_error());
        assert!(job.is_null());
        assert!(t.elapsed() < Duration::from_secs(2));
        // and the library's own parser says the same (the validation split depends on the data)
        if !needle.starts_with("validation_cases") {
            assert!(TrainConfig::from_user_json(json).unwrap_err().to_string().contains(needle));
        }
    }
    // A split that can be met starts.
    let c = CString::new(r#"{"preset": "test-tiny", "validation_cases": 1}"#).unwrap();
    let mut job: *mut sfr_job = std::ptr::null_mut();
    assert_eq!(unsafe { sfr_train_start(ds, c.as_ptr(), &mut job) }, SFR_OK, "{}", last_error());
    unsafe {
        sfr_job_cancel(job);
        sfr_job_free(job);
        sfr_dataset_free(ds);
    }

    // The CLI: refused before the dataset is even read, in well under the time of a SAM stage.
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 3, &PhantomSpec { dims: [16, 16, 16], num_classes: 2, noise: 0.3 }, 3).unwrap();
    let d = dir.path().to_str().unwrap();
    let out = dir.path().join("m.sfrmodel");
    for (set, needle) in [
        (r#"{"threads": 512}"#, "threads"),
        (r#"{"sam": {"image_size": 100000}}"#, "sam.image_size"),
        (r#"{"vnet": {"labeled_batch": 100000}}"#, "vnet.labeled_batch"),
        (r#"{"vnet": {"lr": -0.01}}"#, "vnet.lr"),
        (r#"{"vnet": {"n_filters": 0}}"#, "vnet.n_filters"),
        (r#"{"sam": {"lora_rank": 0}}"#, "sam.lora_rank"),
        (r#"{"validation_cases": 2}"#, "validation_cases 2"),
    ] {
        let t = Instant::now();
        let o = run_logged(&["train", "--data", d, "--labeled", "2", "--preset", "test-tiny", "--sfr", "--set", set, "--out", out.to_str().unwrap(), "--progress", "none"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{set}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked") && !err.contains("[finetune]"), "{set}: {err}");
        assert!(t.elapsed() < Duration::from_secs(20), "{set}: {:?}", t.elapsed());
        assert!(!out.exists());
    }
    // Pseudo-labels from a folder: only with SFR on, and only from a folder.
    let missing = dir.path().join("no-such-folder");
    for (args, needle) in [
        (vec!["--set", r#"{"sfr": false}"#, "--pseudo-labels", d], "needs SFR on"),
        (vec!["--sfr", "--pseudo-labels", missing.to_str().unwrap()], "no-such-folder: --pseudo-labels needs a folder"),
    ] {
        let o = run(&[&["train", "--data", d, "--labeled", "2", "--preset", "test-tiny", "--out", out.to_str().unwrap(), "--progress", "none"][..], &args].concat());
        assert!(o.status.code() == Some(1) && stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    let o = run(&["train", "--data", d, "--labeled", "2", "--threads", "512", "--out", out.to_str().unwrap(), "--progress", "none"]);
    assert!(o.status.code() == Some(1) && stderr(&o).contains("threads = 512"), "{}", stderr(&o));
    let o = run(&["stitch", &format!("{d}/imagesTr/phantom_000.nii.gz"), dir.path().join("c.png").to_str().unwrap(), "--canvas", "100000"]);
    assert!(o.status.code() == Some(1) && stderr(&o).contains("--canvas"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------
// Outputs

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn outputs_never_destroy_inputs_and_failures_keep_old_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path());
    let m = model.to_str().unwrap();
    let img = dir.path().join("img.nii.gz");
    nifti::write(&img, &small_volume()).unwrap();
    let i = img.to_str().unwrap();
    let before = bytes(&img);
    let model_before = bytes(&model);
    let link = dir.path().join("link.nii.gz");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let l = link.to_str().unwrap();
    let dotted = format!("{}/./img.nii.gz", dir.path().display());

    // Output = input, in every spelling.
    for args in [
        vec!["segment", "--model", m, "--input", i, "--output", i, "--progress", "none"],
        vec!["segment", "--model", m, "--input", i, "--output", l, "--progress", "none"],
        vec!["segment", "--model", m, "--input", i, "--output", &dotted, "--progress", "none"],
        vec!["segment", "--model", m, "--input", i, "--output", m, "--progress", "none"],
        vec!["stitch", i, i],
        vec!["stitch", i, l],
        vec!["convert", i, i],
    ] {
        let o = run(&args);
        assert_clean_failure(&o, "output is an input", &format!("{args:?}"));
        assert_eq!(bytes(&img), before, "{args:?} changed the input");
        assert_eq!(bytes(&model), model_before);
    }
    // a probability map that would overwrite the input image
    let p_in = dir.path().join("pp_class0.nii.gz");
    std::fs::copy(&img, &p_in).unwrap();
    let o = run(&["segment", "--model", m, "--input", p_in.to_str().unwrap(), "--output", dir.path().join("s.nii.gz").to_str().unwrap(), "--probabilities", dir.path().join("pp.nii.gz").to_str().unwrap(), "--progress", "none"]);
    assert_clean_failure(&o, "output is an input", "probabilities over the input");
    assert_eq!(bytes(&p_in), before);

    // train --out onto a dataset image or label, the dataset.json or the labelled list
    let data = dir.path().join("data");
    write_dataset(&data, 3, &PhantomSpec { dims: [16, 16, 16], num_classes: 2, noise: 0.3 }, 5).unwrap();
    let list = dir.path().join("labelled.txt");
    std::fs::write(&list, "phantom_000\n").unwrap();
    for target in ["imagesTr/phantom_001.nii.gz", "labelsTr/phantom_000.nii.gz", "dataset.json"] {
        let t = data.join(target);
        let keep = bytes(&t);
        let o = run(&["train", "--data", data.to_str().unwrap(), "--labeled", "1", "--preset", "test-tiny", "--out", t.to_str().unwrap(), "--progress", "none"]);
        assert_clean_failure(&o, "output is an input", target);
        assert_eq!(bytes(&t), keep, "{target} was changed");
    }
    let o = run(&["train", "--data", data.to_str().unwrap(), "--labeled-list", list.to_str().unwrap(), "--preset", "test-tiny", "--out", list.to_str().unwrap(), "--progress", "none"]);
    assert_clean_failure(&o, "output is an input", "labelled list");

    // Missing and unwritable output folders: refused up front.
    let seg = dir.path().join("missing/seg.nii.gz");
    let o = run(&["segment", "--model", m, "--input", i, "--output", seg.to_str().unwrap(), "--progress", "none"]);
    assert_clean_failure(&o, "does not exist", "missing output folder");
    assert_clean_failure(&o, &dir.path().join("missing").display().to_string(), "missing output folder");
    let o = run(&["segment", "--model", m, "--input", i, "--output", "/proc/sfr-seg.nii.gz", "--progress", "none"]);
    assert_clean_failure(&o, "/proc", "unwritable output folder");
    let o = run(&["convert", i, "/proc/sfr.nii"]);
    assert_clean_failure(&o, "/proc", "convert into /proc");
    for (out, needle) in [(dir.path().join("nope/m.sfrmodel"), "does not exist"), (PathBuf::from("/proc/m.sfrmodel"), "/proc")] {
        let t = Instant::now();
        let o = run_logged(&["train", "--data", data.to_str().unwrap(), "--labeled", "1", "--preset", "test-tiny", "--sfr", "--out", out.to_str().unwrap(), "--progress", "none"]);
        assert_clean_failure(&o, needle, &format!("train --out {}", out.display()));
        assert!(!stderr(&o).contains("[finetune]"), "the SAM stage ran before the check");
        assert!(t.elapsed() < Duration::from_secs(20));
    }
    // a read-only folder (only meaningful when not root: root writes anyway)
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
    std::fs::set_permissions(&ro, perm.clone()).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let o = run(&["segment", "--model", m, "--input", i, "--output", ro.join("s.nii.gz").to_str().unwrap(), "--progress", "none"]);
        assert_clean_failure(&o, "ro", "read-only folder");
    } else {
        eprintln!("(running as root: the read-only folder case is covered by /proc above)");
    }
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&ro, perm).unwrap();

    // A failed run leaves an existing output file intact.
    let existing = dir.path().join("existing.nii.gz");
    std::fs::write(&existing, b"previous result").unwrap();
    let broken = dir.path().join("broken.nii.gz");
    std::fs::write(&broken, &before[..before.len() / 2]).unwrap();
    for args in [
        vec!["segment", "--model", m, "--input", broken.to_str().unwrap(), "--output", existing.to_str().unwrap(), "--progress", "none"],
        vec!["convert", broken.to_str().unwrap(), existing.to_str().unwrap()],
        vec!["segment", "--model", dir.path().join("no.sfrmodel").to_str().unwrap(), "--input", i, "--output", existing.to_str().unwrap(), "--progress", "none"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(bytes(&existing), b"previous result", "{args:?} damaged the existing output");
    }
    let existing_model = dir.path().join("existing.sfrmodel");
    std::fs::write(&existing_model, b"previous model").unwrap();
    std::fs::write(data.join("imagesTr/phantom_002.nii.gz"), b"damaged").unwrap();
    let o = run(&["train", "--data", data.to_str().unwrap(), "--labeled", "1", "--preset", "test-tiny", "--no-sam", "--out", existing_model.to_str().unwrap(), "--progress", "none"]);
    assert_clean_failure(&o, "phantom_002.nii.gz", "train on a damaged case");
    assert_eq!(bytes(&existing_model), b"previous model");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with(".sfr-tmp")).collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Data sets and lists

#[test]
fn dataset_mistakes_are_errors_and_missing_unlabelled_labels_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 4, &PhantomSpec { dims: [32, 32, 16], num_classes: 2, noise: 0.3 }, 9).unwrap();
    let d = data.to_str().unwrap();
    let out = dir.path().join("m.sfrmodel");
    let o_s = out.to_str().unwrap();
    let jp = data.join("dataset.json");
    let original = std::fs::read_to_string(&jp).unwrap();
    let train_set = |set: &str, extra: &[&str]| {
        // --allow-weak: a 2-iteration model learns nothing, and that is not what this test is about.
        let mut a = vec!["train", "--data", d, "--preset", "test-tiny", "--no-sam", "--set", set, "--out", o_s, "--progress", "none", "--allow-weak"];
        a.extend_from_slice(extra);
        run(&a)
    };
    let train = |extra: &[&str]| train_set(r#"{"vnet": {"iterations": 2}}"#, extra);

    // The label of an unlabelled case is never needed: its file may be missing.
    std::fs::remove_file(data.join("labelsTr/phantom_003.nii.gz")).unwrap();
    let o = train(&["--labeled", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
    // ...but a labelled case's label must be there.
    let o = train(&["--labeled", "4"]);
    assert_clean_failure(&o, "labelsTr/phantom_003.nii.gz", "missing label of a labelled case");

    // A case listed twice in dataset.json.
    let mut j: serde_json::Value = serde_json::from_str(&original).unwrap();
    let first = j["training"][0].clone();
    j["training"].as_array_mut().unwrap().push(first);
    std::fs::write(&jp, j.to_string()).unwrap();
    let o = train(&["--labeled", "2"]);
    assert_clean_failure(&o, "dataset.json", "duplicate case");
    assert!(stderr(&o).contains("twice"), "{}", stderr(&o));

    // Classes {0, 2}.
    let mut j: serde_json::Value = serde_json::from_str(&original).unwrap();
    j["labels"] = serde_json::json!({"0": "background", "2": "organ"});
    std::fs::write(&jp, j.to_string()).unwrap();
    let o = train(&["--labeled", "2"]);
    assert_clean_failure(&o, "1 is missing", "class gap");
    // ...the same rule for the pipeline's in-memory inputs (the C ABI's path): its classes are
    // a `Classes`, which cannot be made with a gap
    let e = sfr::limits::Classes::new("labels", [(0, "bg".into()), (2, "x".into())].into()).unwrap_err().to_string();
    assert!(e.contains("1 is missing"), "{e}");
    std::fs::write(&jp, &original).unwrap();

    // A labelled list with a case twice.
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "phantom_000\nphantom_001\nphantom_000.nii.gz\n").unwrap();
    let o = train(&["--labeled-list", list.to_str().unwrap()]);
    assert_clean_failure(&o, "list.txt", "duplicate in the labelled list");

    // An explicit validation split that cannot be met.
    let o = train_set(r#"{"validation_cases": 3, "vnet": {"iterations": 2}}"#, &["--labeled", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("validation_cases 3"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------
// Streams and signals

#[test]
fn closed_stdout_and_full_disk_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path());
    let img = dir.path().join("img.nii.gz");
    nifti::write(&img, &small_volume()).unwrap();
    for file in [&model, &img] {
        // `sfr info M | true`: the reader is gone before sfr writes.
        let mut child = sfr_bin().args(["info", file.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked") && !err.contains("error"), "closed stdout: {err}");
        assert!(matches!(o.status.code(), Some(0) | Some(141)), "closed stdout: {:?}", o.status);
        // `sfr info M > /dev/full`
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let o = sfr_bin().args(["info", file.to_str().unwrap()]).stdout(full).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "full disk: {err}");
        assert!(!err.contains("panicked") && err.contains("<stdout>") && err.contains("No space left"), "full disk: {err}");
    }
}

/// A dataset whose unlabelled case is large, so that pseudo-labelling it takes much longer
/// than the cancel budget.
fn slow_pseudolabel_dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    write_dataset(&data, 2, &PhantomSpec { dims: [32, 32, 16], num_classes: 2, noise: 0.3 }, 11).unwrap();
    let (big, _) = phantom(12, &PhantomSpec { dims: [128, 128, 96], num_classes: 2, noise: 0.3 });
    nifti::write(data.join("imagesTr/phantom_001.nii.gz"), &big).unwrap();
    std::fs::remove_file(data.join("labelsTr/phantom_001.nii.gz")).unwrap();
    data
}

const SLOW_SAM: &str = r#"{"sam": {"iterations": 2, "batch": 1}, "vnet": {"iterations": 2}}"#;

#[test]
fn cancel_during_pseudo_labelling_takes_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let data = slow_pseudolabel_dataset(dir.path());
    let ds = sfr::io::dataset::Dataset::open(&data).unwrap();
    let (l, u) = ds.split_first(1).unwrap();
    let inputs = TrainInputs { labeled: sfr::pipeline::sources(&l), unlabeled: sfr::pipeline::sources(&u), classes: ds.labels.clone(), dataset_name: ds.name.clone() };
    let cfg = TrainConfig::test_tiny().with_overrides(SLOW_SAM).unwrap();
    let mut job = Job::spawn(None, move |r: &Reporter| train(&cfg, &inputs, &RunOptions::default(), r).map(|_| ())).unwrap();
    let t = Instant::now();
    while job.progress().stage != "pseudolabel" {
        assert!(t.elapsed() < Duration::from_secs(120), "pseudo-labelling never started");
        assert!(!job.is_finished(), "the job ended early: {:?}", job.wait().err());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    job.cancel();
    assert!(matches!(job.wait(), Err(sfr::Error::Cancelled)));
    assert!(asked.elapsed() < Duration::from_secs(5), "cancel during pseudo-labelling took {:?}", asked.elapsed());
}

#[test]
fn ctrl_c_during_pseudo_labelling_once_and_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = slow_pseudolabel_dataset(dir.path());
    for presses in [1, 2] {
        let out = dir.path().join(format!("m{presses}.sfrmodel"));
        let mut child = sfr_bin()
            .args(["train", "--data", data.to_str().unwrap(), "--labeled", "1", "--preset", "test-tiny", "--sfr", "--set", SLOW_SAM])
            .args(["--out", out.to_str().unwrap(), "--progress", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A reader thread follows the JSON progress events and signals the pseudo-labelling stage.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut seen = false;
            for l in std::io::BufReader::new(stdout).lines() {
                let l = l.unwrap_or_default();
                if !seen && l.contains("\"stage\":\"pseudolabel\"") {
                    seen = true;
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("pseudo-labelling never started: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        for _ in 0..presses {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            std::thread::sleep(Duration::from_millis(100));
        }
        while child.try_wait().unwrap().is_none() {
            if asked.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = asked.elapsed();
        let o = child.wait_with_output().unwrap();
        reader.join().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(130), "{presses} Ctrl-C: {:?} {err}", o.status);
        assert!(!err.contains("panicked") && !err.contains("terminate called"), "{presses} Ctrl-C: {err}");
        assert!(took < Duration::from_secs(5), "{presses} Ctrl-C took {took:?}");
        assert!(!out.exists(), "a model was written");
    }
}

// ---------------------------------------------------------------------------------------------
// An archive: `segment --manifest` split into shards

/// Three shards of one manifest, run at the same time as a job array would: every volume is
/// segmented by exactly one shard, a broken input fails its row only (that shard exits 1, the
/// others 0), and a rerun skips every finished output and retries only the failed row.
#[test]
fn manifest_shards_segment_every_volume_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path());
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let mut manifest = String::from("input,output\n");
    for k in 0..7 {
        let input = dir.path().join(format!("v{k}.nii.gz"));
        if k == 4 {
            std::fs::write(&input, b"not a NIfTI file").unwrap();
        } else {
            nifti::write(&input, &small_volume()).unwrap();
        }
        // relative paths: resolved against the manifest's folder
        manifest += &format!("v{k}.nii.gz,out/s{k}.nii.gz\n");
    }
    let mpath = dir.path().join("archive.csv");
    std::fs::write(&mpath, manifest).unwrap();
    let shard = |i: usize| {
        sfr_bin()
            .args(["segment", "--model", model.to_str().unwrap(), "--manifest", mpath.to_str().unwrap(), "--shard", &format!("{i}/3"), "--progress", "none"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let outputs: Vec<Output> = (0..3).map(shard).collect::<Vec<_>>().into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let mut segmented: Vec<String> = vec![];
    for (i, o) in outputs.iter().enumerate() {
        let err = stderr(o);
        assert!(!err.contains("panicked"), "shard {i}: {err}");
        // row 4 (the broken input) belongs to shard 4 mod 3 = 1
        assert_eq!(o.status.code(), Some(if i == 1 { 1 } else { 0 }), "shard {i}: {err}");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let (word, rest) = line.split_once(' ').unwrap();
            match word {
                "segmented" => segmented.push(rest.to_string()),
                "failed" => assert!(rest.contains("v4.nii.gz"), "shard {i}: {line}"),
                other => panic!("shard {i}: unexpected {other}: {line}"),
            }
        }
        if i == 1 {
            assert!(err.contains("v4.nii.gz") && err.contains("1 failed"), "{err}");
        }
    }
    segmented.sort();
    let expected: Vec<String> = [0, 1, 2, 3, 5, 6].iter().map(|k| format!("{} -> {}", dir.path().join(format!("v{k}.nii.gz")).display(), dir.path().join(format!("out/s{k}.nii.gz")).display())).collect();
    assert_eq!(segmented, expected, "each volume exactly once");
    for k in [0, 1, 2, 3, 5, 6] {
        let seg = nifti::read(dir.path().join(format!("out/s{k}.nii.gz"))).unwrap();
        assert_eq!(seg.dims(), small_volume().dims());
    }
    assert!(!dir.path().join("out/s4.nii.gz").exists(), "no output for the failed row");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().map(|e| file_name(&e.unwrap().path())).filter(|n| !n.starts_with('s')).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // the broken input repaired, the whole manifest once more without sharding: six skipped,
    // one segmented
    nifti::write(dir.path().join("v4.nii.gz"), &small_volume()).unwrap();
    let o = run(&["segment", "--model", model.to_str().unwrap(), "--manifest", mpath.to_str().unwrap(), "--progress", "none"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().filter(|l| l.starts_with("skipped ")).count(), 6, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("segmented ")).map(|l| l.contains("v4.nii.gz")).collect::<Vec<_>>(), vec![true], "{out}");

    // a manifest mistake is refused before any work, naming the file and the lines
    std::fs::write(&mpath, "v0.nii.gz,out/x.nii.gz\nv1.nii.gz,out/x.nii.gz\n").unwrap();
    let o = run(&["segment", "--model", model.to_str().unwrap(), "--manifest", mpath.to_str().unwrap()]);
    assert_clean_failure(&o, "archive.csv", "duplicate output");
    assert!(stderr(&o).contains("lines 1 and 2"), "{}", stderr(&o));
    let o = run(&["segment", "--model", model.to_str().unwrap(), "--manifest", mpath.to_str().unwrap(), "--shard", "3/3"]);
    assert!(!o.status.success() && stderr(&o).contains("0 <= i < n"), "{}", stderr(&o));
}

/// `sfr plan` on a dataset: a fingerprint and a plan as JSON, the preset's patch, and a note
/// on stderr when a patch sees little of the foreground; a missing folder is a clear error.
#[test]
fn plan_prints_the_fingerprint_and_what_the_preset_makes_of_it() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 3, &PhantomSpec { dims: [24, 24, 16], num_classes: 3, noise: 0.2 }, 5).unwrap();
    let data = dir.path().to_str().unwrap();
    let o = run(&["plan", "--data", data, "--labeled", "2", "--preset", "test-tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["fingerprint"]["cases"], 3);
    assert_eq!(v["fingerprint"]["labelled"], 2);
    assert_eq!(v["fingerprint"]["classes"].as_array().unwrap().len(), 2);
    assert_eq!(v["plan"]["patch"], serde_json::json!(TrainConfig::test_tiny().patch));
    assert!(v["fingerprint"]["foreground_intensity"]["std"].as_f64().unwrap() > 0.0);
    // A tiny spacing: a patch spans a sliver of the foreground, and the note says so.
    let o = run(&["plan", "--data", data, "--labeled", "2", "--preset", "test-tiny", "--set", r#"{"spacing": [0.05, 0.05, 0.05]}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("spans at least half of it"), "{}", stderr(&o));
    // The phantoms' "synthetic MRI": the per-volume z-score. Declared CT: one window from the
    // labelled foreground, said on stderr; `--set` overrides either way.
    assert!(v["plan"]["normalization"].as_str().unwrap().starts_with("per-volume z-score"), "{}", v["plan"]);
    assert!(stderr(&o).contains("normalisation: per-volume z-score: dataset.json names the modality \"synthetic MRI\""), "{}", stderr(&o));
    let jp = dir.path().join("dataset.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&jp).unwrap()).unwrap();
    j["modality"] = serde_json::json!({"0": "CT"});
    std::fs::write(&jp, j.to_string()).unwrap();
    let o = run(&["plan", "--data", data, "--labeled", "2", "--preset", "test-tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let i = &v["fingerprint"]["foreground_intensity"];
    let f32_of = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    let want = format!("CT: clip to the labelled foreground's 0.5-99.5th percentiles [{}, {}]", f32_of(&i["p0_5"]), f32_of(&i["p99_5"]));
    assert!(v["plan"]["normalization"].as_str().unwrap().starts_with(&want), "{} vs {want}", v["plan"]["normalization"]);
    assert!(stderr(&o).contains("normalisation: CT"), "{}", stderr(&o));
    // `sfr train` resolves it the same way and the model carries the window.
    let model = dir.path().join("ct.sfrmodel");
    let o = run(&["train", "--data", data, "--labeled", "2", "--preset", "test-tiny", "--method", "supervised", "--no-sam", "--allow-weak", "--out", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("normalisation: CT"), "{}", stderr(&o));
    let meta = sfr::model::SfrModel::read_meta(&model).unwrap();
    assert_eq!(meta.normalization, "ct-foreground");
    assert_eq!(meta.normalization_window.unwrap().clip, [f32_of(&i["p0_5"]), f32_of(&i["p99_5"])]);
    let o = run(&["plan", "--data", data, "--labeled", "2", "--preset", "test-tiny", "--set", r#"{"normalization": "zscore"}"#]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["plan"]["normalization"].as_str().unwrap().starts_with("per-volume z-score"), "{}", v["plan"]);
    let o = run(&["plan", "--data", "/nonexistent/dataset"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/dataset"), "{}", stderr(&o));
}
