//! Our PyTorch checkpoint reader against files written by PyTorch itself
//! (tests/reference/make_checkpoints.py): every tensor must come back bit for bit, and broken or
//! hostile files must be clean errors naming the file.
mod common;

use serde_json::Value;
use sfr::io::pytorch::{self, PickleValue, RawTensor};
use sfr::nn::weights::{self, LoadPolicy};
use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// The reference files, made once per test run (None when there is no Python with torch).
fn refs() -> Option<&'static (PathBuf, Value)> {
    static REFS: OnceLock<Option<(PathBuf, Value)>> = OnceLock::new();
    REFS.get_or_init(|| {
        let py = common::python()?;
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pytorch_checkpoint");
        let _ = std::fs::remove_dir_all(&dir);
        common::run_python(&py, "make_checkpoints.py", &[dir.to_str().unwrap()]);
        let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        Some((dir, expected))
    })
    .as_ref()
}

/// CRC-32 (IEEE, as Python's zlib.crc32) of the bytes the Python side described.
fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks one tensor (dtype name, shape, bytes) against its expected.json entry.
fn check(file: &str, e: &Value, dtype: &str, shape: &[i64], bytes: &[u8]) {
    let name = e["name"].as_str().unwrap();
    assert_eq!(dtype, e["dtype"].as_str().unwrap(), "{file} {name}: dtype");
    let want_shape: Vec<i64> = e["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
    assert_eq!(shape, want_shape.as_slice(), "{file} {name}: shape");
    assert_eq!(bytes.len() as u64, e["nbytes"].as_u64().unwrap(), "{file} {name}: byte count");
    if let Some(h) = e.get("hex") {
        assert_eq!(hex(bytes), h.as_str().unwrap(), "{file} {name}: bytes");
    }
    assert_eq!(crc32(bytes) as u64, e["crc32"].as_u64().unwrap(), "{file} {name}: crc32");
}

fn expected<'a>(exp: &'a Value, file: &str) -> &'a Vec<Value> {
    exp["files"][file].as_array().unwrap_or_else(|| panic!("{file} not in expected.json"))
}

fn check_raw_state_dict(file: &str, got: &[(String, RawTensor)], exp: &Value) {
    let want = expected(exp, file);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{file}: names in file order");
    for ((_, t), e) in got.iter().zip(want) {
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        check(file, e, t.dtype.name(), &shape, &t.data);
    }
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let n = t.numel();
    let mut b = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut b, n);
    b
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Double => "float64",
        Kind::Float => "float32",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        other => panic!("unexpected kind {other:?}"),
    }
}

fn check_tensors_by_name(file: &str, got: &[(String, Tensor)], exp: &Value) {
    let want = expected(exp, file);
    assert_eq!(got.len(), want.len(), "{file}: tensor count");
    for e in want {
        let name = e["name"].as_str().unwrap();
        let t = &got.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{file}: no {name}")).1;
        check(file, e, kind_name(t.kind()), &t.size(), &tensor_bytes(t));
    }
}

#[test]
fn state_dicts_match_pytorch_bitwise() {
    let Some((dir, exp)) = refs() else { return };
    for file in [
        "module.pth",
        "module_f16.pth",
        "dtypes.pth",
        "dtypes_proto4.pth",
        "nested.pth",
        "bigendian.pth",
        "sam_tiny.pth",
    ] {
        let sd = pytorch::read_state_dict(dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
        check_raw_state_dict(file, &sd, exp);
    }
}

#[test]
fn raw_tensors_become_equal_tch_tensors() {
    let Some((dir, exp)) = refs() else { return };
    let sd = pytorch::read_state_dict(dir.join("dtypes.pth")).unwrap();
    let as_tensors: Vec<(String, Tensor)> =
        sd.iter().map(|(n, r)| (n.clone(), weights::raw_to_tensor(r).unwrap())).collect();
    check_tensors_by_name("dtypes.pth", &as_tensors, exp);
    // a RawTensor whose bytes do not match its shape is refused, not read past its end
    let bad = RawTensor { dtype: pytorch::TensorDType::F32, shape: vec![4], data: vec![0; 15] };
    assert!(weights::raw_to_tensor(&bad).is_err());
}

#[test]
fn nested_checkpoint_selection_and_tree() {
    let Some((dir, exp)) = refs() else { return };
    let p = dir.join("nested.pth");
    let auto = pytorch::read_state_dict(&p).unwrap();
    let model = pytorch::read_state_dict_at(&p, &["model"]).unwrap();
    assert_eq!(auto, model);
    check_raw_state_dict("nested.pth", &model, exp);
    let e = pytorch::read_state_dict_at(&p, &["epoch"]).unwrap_err().to_string();
    assert!(e.contains("nested.pth") && e.contains("an int (3)"), "{e}");
    let e = pytorch::read_state_dict_at(&p, &["weights"]).unwrap_err().to_string();
    assert!(e.contains("'model'") && e.contains("'optimizer'"), "{e}");

    let PickleValue::Dict(top) = pytorch::read_checkpoint(&p).unwrap() else { panic!("top level is a dict") };
    let get = |d: &[(String, PickleValue)], k: &str| d.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get(&top, "epoch"), PickleValue::Int(3));
    let PickleValue::Dict(opt) = get(&top, "optimizer") else { panic!("optimizer is a dict") };
    let PickleValue::List(groups) = get(&opt, "param_groups") else { panic!("param_groups is a list") };
    let PickleValue::Dict(g0) = &groups[0] else { panic!("a param group is a dict") };
    assert_eq!(get(g0, "lr"), PickleValue::Float(0.001));
    // Adam's per-parameter state is keyed by parameter index (ints), each with tensors
    let PickleValue::Dict(state) = get(&opt, "state") else { panic!("state is a dict") };
    let PickleValue::Dict(s0) = get(&state, "0") else { panic!("state of parameter 0") };
    assert!(matches!(get(&s0, "exp_avg"), PickleValue::Tensor(t) if t.shape == [3, 4]));
}

#[test]
fn load_tensors_reads_pth_and_safetensors() {
    let Some((dir, exp)) = refs() else { return };
    for file in ["module.pth", "sam_tiny.pth", "module.safetensors", "dtypes.safetensors"] {
        let ts = weights::load_tensors(dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
        check_tensors_by_name(file, &ts, exp);
    }
    let (_, meta) = weights::read_safetensors_with_metadata(dir.join("module.safetensors")).unwrap();
    assert_eq!(meta.get("note").map(String::as_str), Some("module"));
}

/// The Python module: Linear(4,3) "0", ReLU "1", Linear(3,2) "2", BatchNorm1d(2) "3".
fn tch_module(vs: &nn::VarStore) {
    let r = vs.root();
    let _ = nn::linear(&r / "0", 4, 3, Default::default());
    let _ = nn::linear(&r / "2", 3, 2, Default::default());
    let _ = nn::batch_norm1d(&r / "3", 2, Default::default());
}

#[test]
fn state_dict_loads_into_a_varstore() {
    let Some((dir, _)) = refs() else { return };
    // tch's BatchNorm keeps no num_batches_tracked: strict loading names it
    let mut vs = nn::VarStore::new(Device::Cpu);
    tch_module(&vs);
    let e = weights::load_file_into_varstore(&mut vs, dir.join("module.pth"), &LoadPolicy::strict())
        .unwrap_err()
        .to_string();
    assert!(e.contains("module.pth") && e.contains("1 unexpected: 3.num_batches_tracked"), "{e}");

    let policy = LoadPolicy { reinit: vec![], ignore_unexpected: vec!["3.num_batches_tracked".into()] };
    let report = weights::load_file_into_varstore(&mut vs, dir.join("module_f16.pth"), &policy).unwrap();
    assert_eq!(report.loaded.len(), 8);
    assert_eq!(report.unexpected, ["3.num_batches_tracked"]);
    assert!(report.missing.is_empty() && report.mismatched.is_empty());
    let file: HashMap<String, Tensor> =
        weights::load_tensors(dir.join("module_f16.pth")).unwrap().into_iter().collect();
    for (name, var) in vs.variables() {
        assert_eq!(var.kind(), Kind::Float, "{name} stays f32");
        assert!(var.equal(&file[&name].to_kind(Kind::Float)), "{name}: f16 values converted exactly");
    }
}

#[test]
fn safetensors_written_by_us_read_back_equal() {
    let Some((dir, _)) = refs() else { return };
    let ts = weights::load_tensors(dir.join("sam_tiny.pth")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let p = out.path().join("sam_tiny.sfrmodel");
    let meta: HashMap<String, String> = [("sfr".to_string(), r#"{"version":1}"#.to_string())].into();
    weights::save_safetensors(&p, &ts, &meta).unwrap();
    let (back, m) = weights::read_safetensors_with_metadata(&p).unwrap();
    assert_eq!(m, meta);
    assert_eq!(back.len(), ts.len());
    for (name, t) in &ts {
        let b = &back.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(b.kind(), t.kind(), "{name}");
        assert!(b.equal(t), "{name}");
    }
}

// ---------------------------------------------------------------------------- bad input

fn assert_clean_err<T: std::fmt::Debug>(r: sfr::Result<T>, file: &Path, want: &str) -> String {
    let e = r.expect_err("must be an error").to_string();
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(name), "error must name {name}: {e}");
    assert!(e.contains(want), "error must say '{want}': {e}");
    e
}

#[test]
fn truncated_files_are_errors() {
    let Some((dir, _)) = refs() else { return };
    let out = tempfile::tempdir().unwrap();
    for src in ["module.pth", "dtypes.pth"] {
        let bytes = std::fs::read(dir.join(src)).unwrap();
        let p = out.path().join(format!("cut_{src}"));
        // every length near the end (the zip directory) and a sweep through the rest
        let cuts = (1..=64).map(|c| bytes.len() - c).chain((0..bytes.len()).step_by(13));
        for keep in cuts {
            std::fs::write(&p, &bytes[..keep]).unwrap();
            assert_clean_err(pytorch::read_state_dict(&p), &p, "");
            assert_clean_err(weights::load_tensors(&p), &p, "");
        }
    }
}

#[test]
fn corrupt_zips_are_errors_or_read_correctly() {
    let Some((dir, exp)) = refs() else { return };
    let out = tempfile::tempdir().unwrap();
    let p = out.path().join("corrupt.pth");
    std::fs::write(&p, b"PK\x03\x04 this is not a zip archive at all").unwrap();
    assert_clean_err(pytorch::read_state_dict(&p), &p, "zip");

    // Flip every byte of a real checkpoint in turn: each result is an error naming the file,
    // or (when the byte does not matter: padding, timestamps, records we do not read) exactly
    // the right tensors. Every byte of the pickle and of the storages must be detected (CRC).
    let good = std::fs::read(dir.join("module.pth")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(good.clone())).unwrap();
    let mut guarded = vec![false; good.len()];
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        let name = f.name().unwrap().into_owned();
        if name.ends_with("data.pkl") || name.contains("/data/") {
            let start = f.data_start().unwrap() as usize;
            guarded[start..start + f.compressed_size() as usize].iter_mut().for_each(|g| *g = true);
        }
    }
    assert!(guarded.iter().filter(|&&g| g).count() > 500);
    // Patching one byte in place is far cheaper than rewriting the file thousands of times.
    std::fs::write(&p, &good).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let mut put = |i: usize, b: u8| {
        f.seek(SeekFrom::Start(i as u64)).unwrap();
        f.write_all(&[b]).unwrap();
    };
    for i in 0..good.len() {
        put(i, good[i] ^ 0x5a);
        let r = pytorch::read_state_dict(&p);
        put(i, good[i]);
        match r {
            Ok(sd) => {
                assert!(!guarded[i], "flipped byte {i} of the pickle or a storage went unnoticed");
                check_raw_state_dict("module.pth", &sd, exp)
            }
            Err(e) => assert!(e.to_string().contains("corrupt.pth"), "{e}"),
        }
    }
}

#[test]
fn forbidden_globals_are_refused_and_never_run() {
    let Some((dir, _)) = refs() else { return };
    let p = dir.join("evil_global.pth");
    assert_clean_err(pytorch::read_state_dict(&p), &p, "'os.system'");
    assert_clean_err(pytorch::read_checkpoint(&p), &p, "'os.system'");
    assert_clean_err(weights::load_tensors(&p), &p, "'os.system'");
    let p = dir.join("evil_reduce.pth");
    assert_clean_err(pytorch::read_state_dict(&p), &p, "'posix.system'");
    assert!(!dir.join("pwned").exists(), "the pickle's command must never run");
}

#[test]
fn lying_views_and_storages_are_errors() {
    let Some((dir, _)) = refs() else { return };
    let p = dir.join("view_beyond.pth");
    assert_clean_err(pytorch::read_state_dict(&p), &p, "reaches element 9 of storage '0' which has 4 elements");
    let p = dir.join("storage_lies.pth");
    assert_clean_err(pytorch::read_state_dict(&p), &p, "holds 16 bytes but the pickle declares 4000");
}

#[test]
fn legacy_format_is_explained() {
    let Some((dir, _)) = refs() else { return };
    let p = dir.join("legacy.pth");
    assert_clean_err(pytorch::read_state_dict(&p), &p, "legacy");
    assert_clean_err(weights::load_tensors(&p), &p, "legacy");
}

/// The official checkpoint format at full size: `segment_anything.build_sam_vit_b()`'s state
/// dict (~375 MB). Run with `cargo test --release --test pytorch_checkpoint -- --ignored`.
#[test]
#[ignore = "writes and reads a 375 MB SAM vit_b checkpoint"]
fn sam_vit_b_state_dict_loads_exactly() {
    let Some(py) = common::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    common::run_python(&py, "make_checkpoints.py", &[dir.path().to_str().unwrap(), "--vit-b"]);
    eprintln!("python: built and saved vit_b in {:.1} s", t0.elapsed().as_secs_f64());
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap()).unwrap();
    let p = dir.path().join("sam_vit_b.pth");

    let t0 = Instant::now();
    let sd = pytorch::read_state_dict(&p).unwrap();
    let read_s = t0.elapsed().as_secs_f64();
    check_raw_state_dict("sam_vit_b.pth", &sd, &exp);
    let elements: usize = sd.iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(elements as u64, exp["info"]["vit_b_state_dict_elements"].as_u64().unwrap());
    // The state dict is the parameters plus one persistent buffer, the prompt encoder's random
    // Fourier matrix [2, 128].
    let buffer = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix";
    let params: usize = sd.iter().filter(|(n, _)| n != buffer).map(|(_, t)| t.numel()).sum();
    assert_eq!(params, 93_735_472, "official vit_b parameter count");
    assert_eq!(elements, params + 256);
    assert_eq!(exp["info"]["vit_b_parameters"].as_u64().unwrap(), 93_735_472);
    let all_crc = sd.iter().fold(0u32, |acc, (_, t)| acc.rotate_left(1) ^ crc32(&t.data));
    drop(sd);

    let t0 = Instant::now();
    let ts = weights::load_tensors(&p).unwrap();
    let tensors_s = t0.elapsed().as_secs_f64();
    assert_eq!(ts.len(), expected(&exp, "sam_vit_b.pth").len());
    eprintln!(
        "vit_b: {} tensors, {elements} elements, combined crc {all_crc:08x}; read_state_dict {read_s:.2} s, \
         load_tensors (to tch) {tensors_s:.2} s",
        ts.len()
    );
}
