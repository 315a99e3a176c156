//! V-Net: architecture (parameter counts, state-dict keys), input checks, safetensors weights
//! with BatchNorm statistics, and parity with the PyTorch reference in
//! tests/reference/vnet_reference.py (eval forward, one SGD training step, and our weights
//! loading into PyTorch with strict=True).
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sfr::nn::vnet::{VNet, VNetConfig};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

fn build(cfg: &VNetConfig) -> (nn::VarStore, VNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = VNet::new(&vs.root(), cfg).unwrap();
    (vs, net)
}

fn small(deep_supervision: bool) -> VNetConfig {
    VNetConfig { in_channels: 1, num_classes: 2, n_filters: 4, deep_supervision, dropout: Some(0.5) }
}

/// max |a - b| / max |b|: the relative error the parity tests bound.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    tensors.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no tensor {name}")).1.shallow_clone()
}

#[test]
fn parameter_counts_match_the_reference() {
    let (vs, net) = build(&VNetConfig { dropout: None, ..VNetConfig::default() });
    assert_eq!(net.num_parameters(), 9_448_866);
    let trainable: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    assert_eq!(trainable, 9_448_866, "the VarStore's trainable variables are exactly the parameters");

    let (_, net) = build(&VNetConfig { deep_supervision: true, ..VNetConfig::default() });
    assert_eq!(net.num_parameters(), 9_449_320);
    // 9 conv stages (1+2+3+3+3+3+3+2+1 convs) and 8 resampling blocks: 29 conv+BN pairs of 7
    // tensors each, plus out_conv and the 3 heads; PyTorch's state dict has the same 211.
    assert_eq!(net.state_dict().len(), 29 * 7 + 2 + 6);
}

#[test]
fn state_dict_keys_are_pytorch_keys_and_live_in_the_varstore() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = VNet::new(&(vs.root() / "student"), &VNetConfig { deep_supervision: true, ..VNetConfig::default() }).unwrap();
    let keys: Vec<String> = net.state_dict().into_iter().map(|(k, _)| k).collect();
    for k in [
        "block_one.conv.0.weight",
        "block_one.conv.1.running_mean",
        "block_one.conv.1.num_batches_tracked",
        "block_one_dw.conv.0.weight",
        "block_three.conv.6.weight",
        "block_three.conv.7.running_var",
        "block_five_up.conv.0.weight",
        "block_nine.conv.1.bias",
        "out_conv.weight",
        "out_conv_six.weight",
        "out_conv_eight.bias",
    ] {
        assert!(keys.iter().any(|x| x == k), "missing key {k}");
    }
    assert_eq!(keys[0], "block_one.conv.0.weight", "PyTorch's registration order");
    // Every tensor of the state dict is a variable of the store (so VarStore::save/load and the
    // optimizers see them), the BatchNorm buffers as non-trainable ones.
    let vars = vs.variables();
    assert_eq!(vars.len(), keys.len());
    for k in &keys {
        assert!(vars.contains_key(&format!("student.{k}")), "{k} not in the VarStore");
    }
    let n_trainable = vs.trainable_variables().len();
    let n_buffers = keys.iter().filter(|k| k.contains("running_") || k.contains("num_batches")).count();
    assert_eq!(n_trainable + n_buffers, keys.len());
    let transposed = &vars["student.block_five_up.conv.0.weight"];
    assert_eq!(transposed.size(), [256, 128, 2, 2, 2], "ConvTranspose3d weight is [in, out, k, k, k]");
    assert_eq!(vars["student.block_one.conv.1.num_batches_tracked"].kind(), Kind::Int64);
}

#[test]
fn any_channels_and_classes_with_deep_supervision() {
    let cfg = VNetConfig { in_channels: 3, num_classes: 4, n_filters: 4, deep_supervision: true, dropout: Some(0.5) };
    let (_, net) = build(&cfg);
    let x = Tensor::randn([2, 3, 16, 32, 48], (Kind::Float, Device::Cpu));
    let (out, aux) = net.f_forward_with_aux(&x, true).unwrap();
    assert_eq!(out.size(), [2, 4, 16, 32, 48]);
    assert_eq!(aux.len(), 3);
    for a in &aux {
        assert_eq!(a.size(), [2, 4, 16, 32, 48]);
    }
    let y = net.forward_t(&x, false);
    assert_eq!(y.size(), [2, 4, 16, 32, 48]);
    assert_eq!(y.kind(), Kind::Float);
    // Eval mode is deterministic (no dropout, running statistics).
    assert!(rel_err(&net.forward_t(&x, false), &y) == 0.0);
}

#[test]
fn dropout_is_active_only_in_training() {
    let (_, net) = build(&small(false));
    let x = Tensor::randn([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
    let (_, plain) = build(&VNetConfig { dropout: None, ..small(false) });
    tch::no_grad(|| {
        // Same weights, one net with dropout: equal in eval, different in train.
        let mut plain = plain;
        plain.load_state_dict(net.state_dict(), "copy").unwrap();
        assert_eq!(rel_err(&net.forward_t(&x, false), &plain.forward_t(&x, false)), 0.0);
        tch::manual_seed(3);
        let a = net.forward_t(&x, true);
        tch::manual_seed(3);
        let b = plain.forward_t(&x, true);
        assert!(rel_err(&a, &b) > 1e-3, "dropout changed nothing in training mode");
    });
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (_, net) = build(&small(false));
    let cases: Vec<(Tensor, &str)> = vec![
        (Tensor::zeros([1, 16, 16, 16], (Kind::Float, Device::Cpu)), "[batch, channels, nz, ny, nx]"),
        (Tensor::zeros([1, 2, 16, 16, 16], (Kind::Float, Device::Cpu)), "2 channels"),
        (Tensor::zeros([1, 1, 16, 24, 16], (Kind::Float, Device::Cpu)), "multiples of 16"),
        (Tensor::zeros([0, 1, 16, 16, 16], (Kind::Float, Device::Cpu)), "non-empty"),
        (Tensor::zeros([1, 1, 16, 16, 16], (Kind::Int64, Device::Cpu)), "floating-point"),
    ];
    for (x, want) in cases {
        let err = net.f_forward_t(&x, false).unwrap_err().to_string();
        assert!(err.contains(want), "error for {:?} was {err:?}", x.size());
    }
    let x = Tensor::zeros([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
    let err = net.f_forward_with_aux(&x, false).unwrap_err().to_string();
    assert!(err.contains("deep_supervision"), "{err}");

    for bad in [
        VNetConfig { in_channels: 0, ..small(false) },
        VNetConfig { num_classes: 0, ..small(false) },
        VNetConfig { n_filters: 0, ..small(false) },
        VNetConfig { dropout: Some(1.0), ..small(false) },
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(VNet::new(&vs.root(), &bad).is_err(), "{bad:?} accepted");
    }
    let json = r#"{"in_channels": 1, "num_classes": 2, "n_filter": 16}"#;
    assert!(serde_json::from_str::<VNetConfig>(json).is_err(), "a misspelt key must not be ignored");
    let cfg: VNetConfig = serde_json::from_str(r#"{"num_classes": 3}"#).unwrap();
    assert_eq!(cfg, VNetConfig { num_classes: 3, ..VNetConfig::default() });
}

#[test]
fn safetensors_round_trip_keeps_batchnorm_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    tch::manual_seed(1);
    let (_, net) = build(&small(true));
    let x = Tensor::randn([2, 1, 16, 16, 32], (Kind::Float, Device::Cpu));
    // Three training passes move the running statistics away from 0/1 and count to 3.
    tch::no_grad(|| {
        for _ in 0..3 {
            let _ = net.forward_t(&x, true);
        }
    });
    let nbt = get(&net.state_dict(), "block_two.conv.4.num_batches_tracked");
    assert_eq!(nbt.int64_value(&[]), 3);
    let mut meta = std::collections::HashMap::new();
    meta.insert("note".to_string(), "round trip".to_string());
    net.save_safetensors(&path, Some(meta)).unwrap();
    assert!(!dir.path().join(".w.safetensors.partial").exists());

    tch::manual_seed(2);
    let (_, mut other) = build(&small(true));
    let before = other.forward_t(&x, false);
    let want = net.forward_t(&x, false);
    assert!(rel_err(&before, &want) > 1e-3, "two seeds gave the same network");
    let meta = other.load_safetensors(&path).unwrap();
    assert_eq!(meta.get("note").map(String::as_str), Some("round trip"));
    assert_eq!(rel_err(&other.forward_t(&x, false), &want), 0.0);
    for ((k, a), (_, b)) in net.state_dict().iter().zip(other.state_dict().iter()) {
        assert!(a.equal(b), "{k} differs after the round trip");
    }
    let rm = get(&other.state_dict(), "block_one.conv.1.running_mean");
    assert!(rm.abs().max().double_value(&[]) > 0.0, "running_mean was not saved");
}

#[test]
fn wrong_weights_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, net) = build(&small(true));
    let full = dir.path().join("ds.safetensors");
    net.save_safetensors(&full, None).unwrap();

    // Heads in the file, none in the network: unexpected keys, with the hint.
    let (_, mut plain) = build(&small(false));
    let err = plain.load_safetensors(&full).unwrap_err().to_string();
    assert!(err.contains("unexpected keys: out_conv_eight.bias"), "{err}");
    assert!(err.contains("deep_supervision = true"), "{err}");
    assert!(err.contains("ds.safetensors"), "the error names the file: {err}");

    // Other width: shape mismatches, named.
    let (_, mut wide) = build(&VNetConfig { n_filters: 8, ..small(true) });
    let err = wide.load_safetensors(&full).unwrap_err().to_string();
    assert!(err.contains("shape mismatch: block_one.conv.0.weight (file [4, 1, 3, 3, 3], network [8, 1, 3, 3, 3])"), "{err}");

    // A missing key.
    let partial: Vec<(String, Tensor)> =
        net.state_dict().into_iter().filter(|(k, _)| k != "block_two.conv.3.weight").collect();
    let (_, mut target) = build(&small(true));
    let err = target.load_state_dict(partial, "partial").unwrap_err().to_string();
    assert!(err.contains("missing keys: block_two.conv.3.weight"), "{err}");

    // A truncated file and a file that is not safetensors.
    let bytes = std::fs::read(&full).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = target.load_safetensors(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.safetensors") && err.contains("not a valid safetensors file"), "{err}");
    let err = target.load_safetensors(dir.path().join("absent.safetensors")).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");

    // PyTorch's own leniencies: no num_batches_tracked, DataParallel's "module." prefix.
    let old: Vec<(String, Tensor)> = net
        .state_dict()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| (format!("module.{k}"), t))
        .collect();
    target.load_state_dict(old, "old checkpoint").unwrap();
    let x = Tensor::randn([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
    assert_eq!(rel_err(&target.forward_t(&x, false), &net.forward_t(&x, false)), 0.0);
}

#[test]
fn bf16_mixed_precision_tracks_f32_and_trains_f32_weights() {
    tch::manual_seed(4);
    let (vs, mut net) = build(&VNetConfig { dropout: None, ..small(true) });
    let x = Tensor::randn([2, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
    let (want, want_aux) = net.f_forward_with_aux(&x, false).unwrap();
    net.set_bf16(true);
    let (got, got_aux) = net.f_forward_with_aux(&x, false).unwrap();
    for (g, w) in std::iter::once((&got, &want)).chain(got_aux.iter().zip(want_aux.iter())) {
        assert_eq!(g.kind(), Kind::Float);
        let err = rel_err(g, w);
        assert!(err < 5e-2, "bf16 logits are {err} away from f32");
        assert!(err > 0.0, "the bf16 path computed in f32");
    }
    let (out, aux) = net.f_forward_with_aux(&x, true).unwrap();
    let loss = out.mean(Kind::Float) + aux.iter().map(|a| a.mean(Kind::Float)).sum::<Tensor>();
    loss.backward();
    for v in vs.trainable_variables() {
        assert_eq!(v.kind(), Kind::Float);
        assert!(v.grad().defined(), "a weight got no gradient through the bf16 path");
    }
}

/// The reference outputs, made once per test process.
fn reference() -> Option<&'static (tempfile::TempDir, PathBuf)> {
    static REF: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    REF.get_or_init(|| {
        let py = common::python()?;
        let dir = tempfile::tempdir().unwrap();
        common::run_python(&py, "vnet_reference.py", &["make", dir.path().to_str().unwrap(), "--deep-supervision"]);
        Some((dir, py))
    })
    .as_ref()
}

fn ds_config() -> VNetConfig {
    VNetConfig { deep_supervision: true, dropout: None, ..VNetConfig::default() }
}

#[test]
fn eval_forward_matches_pytorch() {
    let Some((dir, _)) = reference() else { return };
    let (_, mut net) = build(&ds_config());
    net.load_safetensors(dir.path().join("init.safetensors")).unwrap();
    let input = read(&dir.path().join("input.safetensors"));
    let want = read(&dir.path().join("eval_out.safetensors"));
    let x = get(&input, "x");
    let (out, aux) = tch::no_grad(|| net.f_forward_with_aux(&x, false)).unwrap();
    let e = rel_err(&out, &get(&want, "out"));
    eprintln!("eval logits: relative error {e:.3e}");
    assert!(e < 1e-4, "logits differ from PyTorch by {e}");
    for (i, a) in aux.iter().enumerate() {
        let e = rel_err(a, &get(&want, &format!("aux{i}")));
        eprintln!("aux {i}: relative error {e:.3e}");
        assert!(e < 1e-4, "deep-supervision output {i} differs from PyTorch by {e}");
    }
}

#[test]
fn one_sgd_step_matches_pytorch() {
    let Some((dir, _)) = reference() else { return };
    let (vs, mut net) = build(&ds_config());
    net.load_safetensors(dir.path().join("init.safetensors")).unwrap();
    let init: Vec<(String, Tensor)> = net.state_dict().into_iter().map(|(k, t)| (k, t.detach().copy())).collect();
    let input = read(&dir.path().join("input.safetensors"));
    let (x, y) = (get(&input, "x"), get(&input, "y"));

    let mut opt = nn::Sgd { momentum: 0.9, dampening: 0.0, wd: 1e-4, nesterov: false }.build(&vs, 0.01).unwrap();
    let loss = net.forward_t(&x, true).cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
    opt.backward_step(&loss);

    let want_loss: f64 = std::fs::read_to_string(dir.path().join("step_loss.txt")).unwrap().trim().parse().unwrap();
    let got_loss = loss.double_value(&[]);
    assert!((got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "loss {got_loss} vs PyTorch {want_loss}");

    let want = read(&dir.path().join("step.safetensors"));
    let mut worst = (0.0f64, "(all exact)".to_string());
    for ((k, after), (_, before)) in net.state_dict().iter().zip(init.iter()) {
        let w = get(&want, k);
        if after.kind() == Kind::Int64 {
            assert!(after.equal(&w), "{k}: {after:?} vs {w:?}");
            continue;
        }
        // Compare the change made by the step (gradient, momentum, weight decay, running
        // statistics' update), not just the weights, which barely move.
        let e = rel_err(&(after - before), &(&w - before));
        if k == "block_five.conv.3.weight" || k == "block_one.conv.1.running_mean" {
            assert!((&w - before).abs().max().double_value(&[]) > 0.0, "{k}: PyTorch's step did not move it");
        }
        if e > worst.0 {
            worst = (e, k.clone());
        }
        if k.starts_with("out_conv_") {
            assert!(after.equal(before), "{k}: a head with no gradient must not move (PyTorch skips it)");
        }
    }
    eprintln!("SGD step: worst relative error of the update {:.3e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-3, "update of {} differs from PyTorch by {}", worst.1, worst.0);
}

#[test]
fn our_weights_load_in_pytorch_strictly() {
    let Some((dir, py)) = reference() else { return };
    // Weights PyTorch never saw: ours, initialised and with statistics moved by training passes.
    tch::manual_seed(5);
    let (_, net) = build(&ds_config());
    let x = get(&read(&dir.path().join("input.safetensors")), "x");
    tch::no_grad(|| {
        let _ = net.forward_t(&x, true);
        let out = net.forward_t(&x, false);
        Tensor::write_safetensors(&[("out", &out)], dir.path().join("rust_out.safetensors")).unwrap();
    });
    let w = dir.path().join("rust_weights.safetensors");
    net.save_safetensors(&w, None).unwrap();
    let line = common::run_python(
        py,
        "vnet_reference.py",
        &["check", dir.path().to_str().unwrap(), w.to_str().unwrap(), "--deep-supervision"],
    );
    let nums: Vec<f64> = line.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let e = nums[0] / nums[1];
    eprintln!("our weights in PyTorch: relative error {e:.3e}");
    assert!(e < 1e-4, "PyTorch with our weights differs by {e}");
}

/// Rough timing of one training step (forward, CE, backward, SGD), printed; run with
/// `cargo test --release --test vnet -- --ignored --nocapture`. Never asserts a time.
#[test]
#[ignore]
fn train_step_timing() {
    eprintln!("libtorch threads: {}", tch::get_num_threads());
    for (b, d, h, w) in [(4i64, 32i64, 48i64, 48i64), (4, 80, 112, 112)] {
        tch::manual_seed(0);
        let (vs, net) = build(&VNetConfig::default());
        let mut opt = nn::Sgd { momentum: 0.9, dampening: 0.0, wd: 1e-4, nesterov: false }.build(&vs, 0.01).unwrap();
        let x = Tensor::randn([b, 1, d, h, w], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(2, [b, d, h, w], (Kind::Int64, Device::Cpu));
        for i in 0..2 {
            let t = std::time::Instant::now();
            let loss = net.forward_t(&x, true).cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0);
            opt.backward_step(&loss);
            eprintln!("batch {b} x [{d}, {h}, {w}] step {i}: {:.3} s", t.elapsed().as_secs_f64());
        }
    }
}
