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
    cfg.patch = [64, 64, 16];
    cfg.sam.image_size = 256; // 64×64 slices: a 4×4 grid, 4×4 ViT tokens per slice
    cfg.sam.batch = 2;
    cfg.sam.lr = 3e-3;
    let spec = PhantomSpec { dims: [64, 64, 16], num_classes: 2, noise: 0.1 };
    let (img, lab) = phantom(3, &spec);
    let image = zscore(&img.data.view(), "phantom").unwrap();
    let r = Reporter::detached(None);
    let mut sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
    let data = [LabeledVolume { image: &image, label: &lab.data }];
    sam.finetune(&cfg, &data, 300, 1, &r).unwrap();
    let p = sam.pseudo_label(&cfg, &image, None).unwrap();
    let m = binary_metrics(&p.label.mapv(|v| v == 1).view(), &lab.data.mapv(|v| v == 1).view(), [1.0; 3]).unwrap();
    eprintln!("dice {:.3}, loss {:.3}, confidence {:.3}", m.dice, r.progress().loss, p.confidence);
    // A SAM trained from scratch (no checkpoint can be downloaded here) on one volume reaches
    // Dice ~0.86 (seen: 0.859 with 1 thread, 0.863 with 2); a broken orientation anywhere in the
    // chain gives ~0. With 32×32 slices (2×2 tokens each) it was on a knife's edge (0.07-0.64
    // depending on the thread count): SAM needs a few 16-pixel tokens per slice.
    assert!(m.dice > 0.7, "SAM could not fit one stitched volume: Dice {}", m.dice);
}
