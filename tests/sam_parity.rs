//! SAM in tch against the official `segment-anything` package (tests/reference/sam_reference.py):
//! the script builds the official model with seeded random weights, saves its state dict with
//! `torch.save`, loads it SAMed's way into a per-class model (possibly at a smaller image size)
//! and records the outputs for a fixed input. Our model loads the same `.pth` and must match:
//! image embedding and low-res logits within 1e-4 relative (CPU, f32).
mod common;

use sfr::nn::lora::Lora;
use sfr::nn::sam::{is_decoder_head, HeadPolicy, LoadReport, Sam, SamConfig};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;
use tch::{nn, Device, Tensor};

const TOL: f64 = 1e-4;

struct Reference {
    dir: tempfile::TempDir,
    /// Keys SAMed's `load_from` re-initialised (every decoder-head key).
    samed_reinit: BTreeSet<String>,
    official_parameters: i64,
}

fn reference(py: &std::path::PathBuf, config: &str, ckpt_size: i64, image_size: i64, num_classes: i64, extra: &[&str]) -> Reference {
    let dir = tempfile::tempdir().unwrap();
    let (c, i, n) = (ckpt_size.to_string(), image_size.to_string(), num_classes.to_string());
    let mut args = vec!["--config", config, "--ckpt-size", &c, "--image-size", &i, "--num-classes", &n, "--out", dir.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let out = common::run_python(py, "sam_reference.py", &args);
    eprintln!("[{config} {ckpt_size}->{image_size}] reference script: {:.1} s", t.elapsed().as_secs_f64());
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).expect("reference JSON");
    eprintln!("  PyTorch forward (per-image decoder, {} threads): {:.2} s", v["threads"], v["forward_seconds"].as_f64().unwrap());
    let samed_reinit = v["reinitialised"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    Reference { dir, samed_reinit, official_parameters: v["official_parameters"].as_i64().unwrap() }
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// (max abs error, max abs error / max abs reference value)
fn errors(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    assert_eq!(ours.size(), reference.size(), "shape");
    let abs = f64::try_from((ours - reference).abs().max()).unwrap();
    let scale = f64::try_from(reference.abs().max()).unwrap().max(1e-12);
    (abs, abs / scale)
}

fn check(name: &str, ours: &Tensor, reference: &Tensor) {
    let (abs, rel) = errors(ours, reference);
    eprintln!("  {name}: shape {:?}, max abs err {abs:.3e}, rel {rel:.3e}", reference.size());
    assert!(rel <= TOL, "{name}: relative error {rel:.3e} > {TOL:e} (max abs {abs:.3e})");
}

/// Puts the reference's seeded values into the re-initialised decoder heads.
fn apply_overrides(sam: &Sam, file: &Path) {
    let overrides = read(file);
    tch::no_grad(|| {
        for (k, v) in &overrides {
            let t = sam.tensor(k).unwrap_or_else(|| panic!("override {k} has no tensor in the model"));
            t.shallow_clone().copy_(v);
        }
    });
}

fn keys(report: &LoadReport) -> BTreeSet<String> {
    report.reinitialised.iter().map(|(k, _)| k.clone()).collect()
}

/// The head keys the shape rule must re-initialise when going from the official 4 mask tokens
/// to `n` tokens (n > 4).
fn expected_shape_rule_reinit(n: i64) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = ["mask_decoder.mask_tokens.weight", "mask_decoder.iou_prediction_head.layers.2.weight", "mask_decoder.iou_prediction_head.layers.2.bias"].iter().map(|s| s.to_string()).collect();
    for i in 4..n {
        for l in 0..3 {
            for wb in ["weight", "bias"] {
                s.insert(format!("mask_decoder.output_hypernetworks_mlps.{i}.layers.{l}.{wb}"));
            }
        }
    }
    s
}

/// Loads the reference checkpoint into `cfg`, checks the load report, runs the forward pass and
/// compares every recorded output.
fn run_parity(r: &Reference, cfg: &SamConfig, expect_resize: bool) {
    let vs = nn::VarStore::new(Device::Cpu);
    let t = Instant::now();
    let sam = Sam::new(&vs.root(), cfg).unwrap();
    eprintln!("  build: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let report = sam.load_checkpoint(&r.dir.path().join("checkpoint.pth"), HeadPolicy::ReinitMismatched).unwrap();
    eprintln!("  load .pth: {:.2} s", t.elapsed().as_secs_f64());

    assert_eq!(keys(&report), expected_shape_rule_reinit(cfg.num_mask_tokens()), "re-initialised keys (shape rule)");
    assert!(report.unused.is_empty());
    let resized: BTreeSet<String> = report.resized.iter().map(|(k, _, _)| k.clone()).collect();
    if expect_resize {
        let mut want: BTreeSet<String> = cfg.encoder_global_attn_indexes.iter().flat_map(|i| ["h", "w"].map(|a| format!("image_encoder.blocks.{i}.attn.rel_pos_{a}"))).collect();
        want.insert("image_encoder.pos_embed".into());
        assert_eq!(resized, want, "resized keys");
    } else {
        assert!(resized.is_empty(), "nothing to resize at the checkpoint's own size: {resized:?}");
    }
    assert_eq!(report.loaded + report.reinitialised.len(), sam.named_tensors().count());

    // Every head key the reference re-initialised gets the reference's values.
    apply_overrides(&sam, &r.dir.path().join("decoder_overrides.safetensors"));
    let out = read(&r.dir.path().join("outputs.safetensors"));

    // The resizing itself, tensor by tensor.
    for (k, v) in &out {
        if k.starts_with("image_encoder.") {
            check(k, sam.tensor(k).unwrap(), v);
        }
    }
    check("pos_embed", sam.image_encoder.pos_embed().unwrap(), &out["pos_embed"]);
    check("dense_pe", &sam.prompt_encoder.get_dense_pe(), &out["dense_pe"]);

    let t = Instant::now();
    let (emb, o) = tch::no_grad(|| {
        let emb = sam.encode_image(&out["input"], None).unwrap();
        let o = sam.decode(&emb).unwrap();
        (emb, o)
    });
    eprintln!("  forward (batch {}, {} threads): {:.2} s", out["input"].size()[0], tch::get_num_threads(), t.elapsed().as_secs_f64());
    check("image_embedding", &emb, &out["image_embedding"]);
    check("low_res_logits", &o.low_res_logits, &out["low_res_logits"]);
    check("iou_predictions", &o.iou_predictions, &out["iou_predictions"]);
    assert_eq!(o.low_res_logits.size(), vec![out["input"].size()[0], cfg.num_mask_tokens(), cfg.low_res_size(), cfg.low_res_size()]);

    // The same forward through a LoRA with B = 0 is the plain model's, bit for bit.
    let lvs = nn::VarStore::new(Device::Cpu);
    let lora = Lora::new(&lvs.root(), &sam, 4).unwrap();
    let emb_lora = tch::no_grad(|| sam.encode_image(&out["input"], Some(&lora)).unwrap());
    assert!(emb_lora.equal(&emb), "LoRA with B = 0 changed the image embedding");
}

#[test]
fn tiny_parity_at_checkpoint_size() {
    let Some(py) = common::python() else { return };
    eprintln!("tiny, 128 -> 128, 4 classes");
    let r = reference(&py, "tiny", 128, 128, 4, &[]);
    let cfg = SamConfig::tiny().with_num_classes(4);
    run_parity(&r, &cfg, false);

    // The same checkpoint as safetensors gives the same tensors as the .pth.
    let a = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &cfg).unwrap();
    let vs_b = nn::VarStore::new(Device::Cpu);
    let b = Sam::new(&vs_b.root(), &cfg).unwrap();
    let ra = a.load_checkpoint(&r.dir.path().join("checkpoint.pth"), HeadPolicy::ReinitMismatched).unwrap();
    let rb = b.load_checkpoint(&r.dir.path().join("checkpoint.safetensors"), HeadPolicy::ReinitMismatched).unwrap();
    assert_eq!(keys(&ra), keys(&rb));
    for ((ka, ta), (kb, tb)) in a.named_tensors().zip(b.named_tensors()) {
        assert_eq!(ka, kb);
        if !is_decoder_head(ka) || !keys(&ra).contains(ka) {
            assert!(ta.equal(tb), "{ka} differs between .pth and .safetensors");
        }
    }
    // The VarStore names are the official keys.
    let names: BTreeSet<String> = vs_b.variables().into_keys().collect();
    let official: BTreeSet<String> = b.named_tensors().map(|(k, _)| k.to_string()).collect();
    assert_eq!(names, official);
    assert!(names.contains("image_encoder.blocks.0.attn.rel_pos_h"));
    assert!(names.contains("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"));
    assert!(names.contains("mask_decoder.transformer.layers.0.self_attn.q_proj.weight"));
    assert!(!names.iter().any(|n| n.contains("pixel_")), "pixel_mean/std are not in the official state dict");
    assert_eq!(r.official_parameters, Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny()).unwrap().num_parameters());

    // SAMed's rule re-initialises every head tensor, as the reference's load_from did.
    let c = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &cfg).unwrap();
    let rc = c.load_checkpoint(&r.dir.path().join("checkpoint.pth"), HeadPolicy::ReinitAllHeads).unwrap();
    assert_eq!(keys(&rc), r.samed_reinit);
}

#[test]
fn tiny_parity_at_smaller_image_size() {
    let Some(py) = common::python() else { return };
    eprintln!("tiny, 128 -> 64, 6 classes");
    let r = reference(&py, "tiny", 128, 64, 6, &[]);
    run_parity(&r, &SamConfig::tiny().with_num_classes(6).with_image_size(64), true);
}

/// The official vit_b (pretraining size 1024, 3 multimask outputs, seeded random weights) loaded
/// from its `.pth` into a 4-class model at 256 pixels (16×16 tokens: windowed blocks pad to 28).
#[test]
fn vit_b_parity_from_1024_checkpoint_at_256() {
    let Some(py) = common::python() else { return };
    eprintln!("vit_b, 1024 -> 256, 4 classes");
    let t = Instant::now();
    let r = reference(&py, "vit_b", 1024, 256, 4, &["--no-safetensors-checkpoint"]);
    assert_eq!(r.official_parameters, 93_735_472);
    run_parity(&r, &SamConfig::vit_b().with_num_classes(4).with_image_size(256), true);
    eprintln!("  total: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn wrong_checkpoints_are_clear_errors() {
    let Some(py) = common::python() else { return };
    let r = reference(&py, "tiny", 128, 128, 3, &[]);
    let ckpt = r.dir.path().join("checkpoint.pth");

    // Another encoder width: every mismatching key is named.
    let mut cfg = SamConfig::tiny();
    cfg.encoder_embed_dim = 96;
    cfg.name = "tiny96".into();
    let sam = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &cfg).unwrap();
    let before = sam.tensor("image_encoder.neck.0.weight").unwrap().copy();
    let err = sam.load_checkpoint(&ckpt, HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("checkpoint.pth"), "{err}");
    assert!(err.contains("60 shape mismatch: image_encoder.blocks.0.attn.proj.bias: [64] in the file, [96] in the model"), "{err}");
    assert!(sam.tensor("image_encoder.neck.0.weight").unwrap().equal(&before), "a failed load must change nothing");

    // Fewer blocks in the model: the file's extra blocks are named.
    let mut cfg = SamConfig::tiny();
    cfg.encoder_depth = 3;
    cfg.encoder_global_attn_indexes = vec![1];
    let sam = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &cfg).unwrap();
    let err = sam.load_checkpoint(&ckpt, HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("not in the model") && err.contains("image_encoder.blocks.3."), "{err}");

    // A truncated file.
    let bad = r.dir.path().join("truncated.pth");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let sam = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny()).unwrap();
    let err = sam.load_checkpoint(&bad, HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("truncated.pth"), "{err}");

    // A missing key.
    let mut t: Vec<(String, Tensor)> = Tensor::read_safetensors(r.dir.path().join("checkpoint.safetensors")).unwrap();
    t.retain(|(k, _)| k != "image_encoder.blocks.2.mlp.lin1.bias");
    let err = sam.load_tensors(t, Path::new("x.safetensors"), HeadPolicy::ReinitMismatched).unwrap_err().to_string();
    assert!(err.contains("missing from the file: image_encoder.blocks.2.mlp.lin1.bias"), "{err}");

    // Same class count as the checkpoint: everything loads, nothing is re-initialised.
    let rep = sam.load_checkpoint(&ckpt, HeadPolicy::ReinitAllHeads).unwrap();
    assert!(rep.reinitialised.is_empty() && rep.resized.is_empty() && rep.unused.is_empty());

    // Fewer classes than the checkpoint: the surplus hypernetwork MLP is reported unused.
    let sam1 = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny().with_num_classes(2)).unwrap();
    let rep = sam1.load_checkpoint(&ckpt, HeadPolicy::ReinitMismatched).unwrap();
    assert_eq!(rep.unused.len(), 6, "{:?}", rep.unused);
    assert!(rep.unused.iter().all(|k| k.starts_with("mask_decoder.output_hypernetworks_mlps.3.")));
}
