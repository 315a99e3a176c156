//! Step parity of the re-training loop with an independent PyTorch reference
//! (tests/reference/retrain_reference.py): the same initial weights and the same batches of
//! labelled + unlabelled crops must give the same losses, the same gradients after the first
//! backward, and the same student (and mean-teacher) weights after several SGD steps.
//!
//! Tolerances: 1e-5 relative before any update; 2e-4 after SGD updates (see below).
//! Dropout stays on (p = 0.5, as in training): both sides draw the Dropout3d masks and the
//! teacher's input noise from libtorch's default generator after the same `manual_seed`, in
//! the same order, so they match exactly; a mismatch in any draw shows as a loss difference.
mod common;

use sfr::pipeline::config::{BnBatches, Method, TrainConfig};
use sfr::pipeline::retrain::{learning_rate, Batch, Trainer};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 4;
const SEED: i64 = 77;

/// Max difference relative to the tensor's largest value, with a floor of `floor` for tensors
/// near zero (a BatchNorm bias a few steps from 0 is a sum of nearly cancelling terms).
fn rel_diff_floor(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let d = f64::try_from((a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max()).unwrap();
    let s = f64::try_from(b.to_kind(Kind::Float).abs().max()).unwrap().max(floor);
    d / s
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    rel_diff_floor(a, b, 1e-3)
}

/// libtorch's generator is global: the two tests must not draw from it at the same time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check_method(method: Method, batchnorm: BnBatches) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(py) = common::python() else { return };
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::test_tiny();
    cfg.method = method;
    cfg.vnet.batchnorm = batchnorm;
    cfg.vnet.n_filters = 4;
    cfg.vnet.iterations = 8;
    // Make the consistency term matter from the first step (weight 1 after a short ramp).
    cfg.vnet.consistency = 1.0;
    cfg.vnet.iterations_per_epoch = 1;
    cfg.vnet.rampup_epochs = 3.0;
    let num_classes = 3usize;
    let mut trainer = Trainer::new(&cfg, num_classes, Device::Cpu).unwrap();
    trainer.net.save_safetensors(dir.path().join("init.safetensors"), None).unwrap();

    // Batches: 2 labelled crops with smooth-ish labels, 2 unlabelled crops.
    let mut batches = vec![];
    let mut named: Vec<(String, Tensor)> = vec![];
    tch::manual_seed(5);
    for i in 0..STEPS {
        let x = Tensor::randn([4, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
        let y = (x.narrow(0, 0, 2).squeeze_dim(1) * 1.5).clamp(0.0, 2.0).round().to_kind(Kind::Int64);
        named.push((format!("x{i}"), x.shallow_clone()));
        named.push((format!("y{i}"), y.shallow_clone()));
        batches.push(Batch { images: x, labels: y, sam_pseudo: None, own_pseudo: None });
    }
    Tensor::write_safetensors(&named, dir.path().join("batches.safetensors")).unwrap();
    let v = &cfg.vnet;
    let config = serde_json::json!({
        "steps": STEPS, "lr": (0..STEPS).map(|i| learning_rate(&cfg, i)).collect::<Vec<_>>(),
        "momentum": v.momentum, "weight_decay": v.weight_decay, "method": method.name(),
        "consistency": v.consistency, "rampup_epochs": v.rampup_epochs,
        "iterations_per_epoch": v.iterations_per_epoch, "ema_decay": v.ema_decay,
        "noise_std": v.noise_std, "noise_clamp": v.noise_clamp, "dropout": v.dropout, "seed": SEED,
        "n_filters": v.n_filters, "num_classes": num_classes, "threads": 1,
        "batchnorm": match v.batchnorm { BnBatches::Joint => "joint", BnBatches::Separate => "separate" },
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    tch::manual_seed(SEED);
    let mut losses = vec![];
    let mut grads0: HashMap<String, Tensor> = HashMap::new();
    let mut student0: Vec<(String, Tensor)> = vec![];
    for (i, b) in batches.iter().enumerate() {
        losses.push(trainer.step(b, i).unwrap());
        if i == 0 {
            for (k, t) in trainer.net.state_dict() {
                if t.requires_grad() {
                    grads0.insert(k.clone(), t.grad().copy());
                }
                student0.push((k, t.copy()));
            }
        }
    }
    common::run_python(&py, "retrain_reference.py", &["steps", dir.path().to_str().unwrap()]);

    // Our SGD (written out so its momentum can be checkpointed) updates p + (-lr·b) in two
    // roundings where PyTorch's `add_(b, alpha=-lr)` fuses them: after 3 updates the loss
    // differs by up to ~6e-5 relative (measured), so steps after the first get 2e-4; the first
    // loss and the first gradients, before any update, must match to 1e-5.
    let want: Vec<f64> = serde_json::from_str(&std::fs::read_to_string(dir.path().join("losses.json")).unwrap()).unwrap();
    for (i, (a, b)) in losses.iter().zip(&want).enumerate() {
        // Separate BatchNorm batches normalise 2 crops at a time, which amplifies that rounding
        // further (measured: up to 1.6e-3 relative by step 3, mean teacher; 3.2e-3, supervised,
        // on an AMD EPYC, whose kernels round differently).
        let later = if batchnorm == BnBatches::Separate { 5e-3 } else { 2e-4 };
        let tol = if i == 0 { 1e-5 } else { later };
        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{}: loss of step {i}: ours {a}, PyTorch {b}", method.name());
    }
    let ref_grads = Tensor::read_safetensors(dir.path().join("grads0.safetensors")).unwrap();
    assert_eq!(ref_grads.len(), grads0.len(), "gradient count");
    let mut worst_grad = 0f64;
    for (k, g) in &ref_grads {
        let ours = grads0.get(k).unwrap_or_else(|| panic!("no gradient for {k}"));
        worst_grad = worst_grad.max(rel_diff(ours, g));
    }
    assert!(worst_grad < 1e-5, "{}: gradients after step 0 differ (max relative {worst_grad:e})", method.name());

    let compare = |ours: Vec<(String, Tensor)>, file: &str, tol: f64| {
        let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(dir.path().join(file)).unwrap().into_iter().collect();
        let mut worst = (0f64, String::new());
        for (k, t) in ours {
            let r = theirs.get(&k).unwrap_or_else(|| panic!("{file}: no {k}"));
            let d = rel_diff_floor(&t, r, 1e-2);
            if d > worst.0 {
                worst = (d, k);
            }
        }
        assert!(worst.0 < tol, "{}: {file} differs: {} relative {:e}", method.name(), worst.1, worst.0);
        worst.0
    };
    // After one update the SGD step itself is checked tightly; after 4, the rounding of the
    // first updates has been amplified by BatchNorm layers on 4 random crops (measured: at most
    // 3.9e-2 on a BatchNorm bias near 0, with the floor of 1e-2), so the trajectory is checked
    // loosely there and tightly through the losses above.
    let w0 = compare(student0, "student0.safetensors", 1e-5);
    // With separate batches, BatchNorm over 2 crops amplifies the first updates' rounding far
    // more (measured: 1.4 relative on a BatchNorm bias near 0 after 4 steps, while the losses
    // still agree within 1.6e-3 and the first step within 1.1e-7): the trajectory is then
    // checked through the losses only.
    let joint = batchnorm == BnBatches::Joint;
    let ws = if joint { compare(trainer.net.state_dict(), "student.safetensors", 1e-1) } else { f64::NAN };
    let mut wt = f64::NAN;
    if method == Method::MeanTeacher && joint {
        wt = compare(trainer.method.teacher().expect("mean teacher has a teacher").state_dict(), "teacher.safetensors", 1e-1);
    }
    eprintln!("{}: losses {losses:?} vs {want:?}; max relative diff: gradients {worst_grad:e}, student after 1 step {w0:e}, after {STEPS} {ws:e}, teacher {wt:e}", method.name());
}

#[test]
fn supervised_steps_match_pytorch() {
    check_method(Method::Supervised, BnBatches::Separate);
}

#[test]
fn mean_teacher_steps_match_pytorch() {
    check_method(Method::MeanTeacher, BnBatches::Separate);
}

/// UA-MT's joint batch (`vnet.batchnorm = "joint"`), still offered to reproduce the paper's code.
#[test]
fn mean_teacher_steps_with_joint_batchnorm_match_pytorch() {
    check_method(Method::MeanTeacher, BnBatches::Joint);
}
