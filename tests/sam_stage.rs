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

#[test]
fn sam_overfits_one_stitched_volume() {
    tch::manual_seed(0);
    let mut cfg = TrainConfig::test_tiny();
    cfg.patch = [32, 32, 32];
    cfg.sam.image_size = 256; // 32×32 slices: an 8×8 grid, 2×2 ViT tokens per slice
    cfg.sam.batch = 2;
    cfg.sam.lr = 3e-3;
    let spec = PhantomSpec { dims: [48, 48, 32], num_classes: 2, noise: 0.1 };
    let (img, lab) = phantom(3, &spec);
    let image = zscore(&img.data.view(), "phantom").unwrap();
    let r = Reporter::detached(None);
    let mut sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
    let data = [LabeledVolume { image: &image, label: &lab.data }];
    sam.finetune(&cfg, &data, 300, 1, &r).unwrap();
    let p = sam.pseudo_label(&cfg, &image).unwrap();
    let m = binary_metrics(&p.label.mapv(|v| v == 1).view(), &lab.data.mapv(|v| v == 1).view(), [1.0; 3]).unwrap();
    eprintln!("dice {:.3}, loss {:.3}, confidence {:.3}", m.dice, r.progress().loss, p.confidence);
    // A SAM trained from scratch (no checkpoint can be downloaded here) on one volume reaches
    // Dice 0.6-0.75 (seen: 0.635 with seed 0); a broken orientation anywhere in the chain gives ~0.
    assert!(m.dice > 0.5, "SAM could not fit one stitched volume: Dice {}", m.dice);
}
