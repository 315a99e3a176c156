//! SAM fine-tuning on stitched volumes can fit what it is shown: after training on one phantom,
//! its pseudo-label of that same phantom matches the label (a check of the whole stitch ->
//! SAM -> unstitch chain, including orientation).
use sfr::job::Reporter;
use sfr::metrics::binary_metrics;
use sfr::phantom::{phantom, PhantomSpec};
use sfr::pipeline::config::TrainConfig;
use sfr::pipeline::data::zscore;
use sfr::pipeline::sam_stage::{LabeledVolume, SamModule};
use tch::Device;

/// SAM fine-tuned on one phantom, stitched as `patch` with every slice magnified `scale`×,
/// pseudo-labels that phantom back on its voxel grid: Dice of class 1.
fn overfit_dice(dims: [usize; 3], scale: usize) -> f64 {
    tch::manual_seed(0);
    let mut cfg = TrainConfig::test_tiny();
    cfg.patch = dims;
    cfg.sam.image_size = 256;
    cfg.sam.scale = scale;
    cfg.sam.batch = 2;
    cfg.sam.lr = 3e-3;
    cfg.validate().unwrap();
    let spec = PhantomSpec { dims, num_classes: 2, noise: 0.1 };
    let (img, lab) = phantom(3, &spec);
    let image = zscore(&img.data.view(), "phantom").unwrap();
    let r = Reporter::detached(None);
    let mut sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
    let data = [LabeledVolume { image: &image, label: &lab.data }];
    sam.finetune(&cfg, &data, 300, 1, &r, None).unwrap();
    let p = sam.pseudo_label(&cfg, &image, None).unwrap();
    assert_eq!(p.probabilities.shape()[1..], *image.shape(), "probabilities on the voxel grid");
    let m = binary_metrics(&p.label.mapv(|v| v == 1).view(), &lab.data.mapv(|v| v == 1).view(), [1.0; 3]).unwrap();
    eprintln!("scale {scale}: dice {:.3}, loss {:.3}, confidence {:.3}", m.dice, r.progress().loss, p.confidence);
    m.dice
}

#[test]
fn sam_overfits_one_stitched_volume() {
    // 64×64 slices: a 4×4 grid on 256², 4×4 ViT tokens per slice.
    let dice = overfit_dice([64, 64, 16], 1);
    // A SAM trained from scratch (no checkpoint can be downloaded here) on one volume reaches
    // Dice ~0.86 (seen: 0.859 with 1 thread, 0.863 with 2); a broken orientation anywhere in the
    // chain gives ~0. With 32×32 slices (2×2 tokens each) it was on a knife's edge (0.07-0.64
    // depending on the thread count): SAM needs a few 16-pixel tokens per slice.
    assert!(dice > 0.7, "SAM could not fit one stitched volume: Dice {dice}");
}

/// The same through `sam.scale`: 32×32 slices magnified 2× fill the same 64×64 cells, and the
/// k×k mean brings SAM's probabilities back to the voxels; a magnification or reduction that
/// shifted or transposed the slices would give a Dice near 0.
#[test]
fn sam_overfits_one_magnified_stitched_volume() {
    let dice = overfit_dice([32, 32, 16], 2);
    assert!(dice > 0.7, "SAM could not fit one volume stitched at 2×: Dice {dice}");
}

/// `sam.lora_last_blocks` with a frozen pretrained encoder: LoRA trains on the last K attention
/// blocks only (their B matrices move, the others stay zero), the encoder's own weights do not
/// change, and pseudo-labelling applies the trained LoRA. K beyond the encoder's blocks is
/// refused when SAM is built. (A frozen random encoder fits a phantom poorly, so fit is not
/// asserted here; the real check is pseudo-label Dice with LiteMedSAM, README.)
#[test]
fn lora_on_the_last_blocks_over_a_cached_frozen_prefix() {
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::test_tiny();
    cfg.patch = [64, 64, 16];
    cfg.sam.image_size = 256;
    cfg.sam.batch = 2;
    cfg.sam.lr = 3e-3;
    let r = Reporter::detached(None);
    // A "pretrained" SAM: the tiny ViT's random weights written as a checkpoint file, so the
    // frozen-encoder path (which needs a checkpoint) runs.
    let file = dir.path().join("tiny.safetensors");
    SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap().sam.save_safetensors(&file).unwrap();
    cfg.sam.checkpoint = Some(file.clone());
    cfg.sam.frozen_encoder_canvases = 8;
    cfg.sam.lora_last_blocks = 1;
    cfg.validate().unwrap();
    let spec = PhantomSpec { dims: cfg.patch, num_classes: 2, noise: 0.1 };
    let (img, lab) = phantom(3, &spec);
    let image = zscore(&img.data.view(), "phantom").unwrap();
    let mut sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
    assert!(sam.frozen_encoder(&cfg));
    let data = [LabeledVolume { image: &image, label: &lab.data }];
    sam.finetune(&cfg, &data, 150, 1, &r, None).unwrap();
    let n = sam.lora.blocks.len();
    for (i, b) in sam.lora.blocks.iter().enumerate() {
        let moved = f64::try_from(b.linear_b_q.abs().max()).unwrap() + f64::try_from(b.linear_b_v.abs().max()).unwrap();
        if i + 1 == n {
            assert!(moved > 0.0, "LoRA of the last block must train");
        } else {
            assert_eq!(moved, 0.0, "LoRA of block {i} of {n} must stay zero");
        }
    }
    let file_tensors: std::collections::HashMap<String, tch::Tensor> = sfr::nn::weights::load_tensors(&file).unwrap().into_iter().collect();
    for (k, t) in sam.sam.named_tensors().filter(|(k, _)| k.starts_with("image_encoder.")) {
        assert!(t.equal(&file_tensors[k]), "{k} changed: the encoder is frozen");
    }
    // Pseudo-labelling runs the whole encoder with the trained LoRA: without it, SAM's
    // probabilities change.
    let with = sam.pseudo_label(&cfg, &image, None).unwrap().probabilities;
    tch::no_grad(|| {
        let _ = sam.lora.blocks[n - 1].linear_b_q.zero_();
        let _ = sam.lora.blocks[n - 1].linear_b_v.zero_();
    });
    let without = sam.pseudo_label(&cfg, &image, None).unwrap().probabilities;
    let change = with.iter().zip(without.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(change > 1e-3, "pseudo-labels must use the trained LoRA (max change {change})");

    // K = 0: the whole encoder frozen and cached, only the decoder trains; LoRA stays zero.
    cfg.sam.lora_last_blocks = 0;
    let mut frozen = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
    frozen.finetune(&cfg, &data, 5, 1, &r, None).unwrap();
    assert!(frozen.lora.blocks.iter().all(|b| f64::try_from(b.linear_b_q.abs().max()).unwrap() == 0.0));
    frozen.pseudo_label(&cfg, &image, None).unwrap();

    cfg.sam.lora_last_blocks = n + 1;
    let e = SamModule::new(&cfg, 2, Device::Cpu, &r).err().expect("more blocks than the encoder has").to_string();
    assert!(e.contains("lora_last_blocks") && e.contains(&n.to_string()), "{e}");
}
