//! V-Net (the re-training network): the V-Net of the UA-MT / ACMT / SFR reference code
//! (`networks/vnet.py`, `normalization='batchnorm'`), with optional deep-supervision heads.
//!
//! Layout: encoder stages of 1/2/3/3/3 `[Conv3d 3³ pad 1, BatchNorm3d, ReLU]`, each followed by a
//! stride-2 2³ conv + BN + ReLU; decoder of stride-2 2³ transposed conv + BN + ReLU, an additive
//! skip from the encoder stage of the same resolution, and stages of 3/3/2/1 convs; a 1³ conv to
//! the class logits. Dropout3d (p = 0.5 by default) on the bottleneck (`x5`) and before the head.
//! With `n_filters = 16` and 2 classes: 9,448,866 parameters, 9,449,320 with the three
//! deep-supervision heads (1³ convs on the outputs of `block_six`, `block_seven`, `block_eight`,
//! i.e. 128, 64 and 32 channels, upsampled trilinearly to the input size).
//!
//! Tensor layout: our volumes are `[nz, ny, nx]`, so a batch is `[B, C, nz, ny, nx]` and a
//! 112×112×80 (x, y, z) patch is a tensor `[B, 1, 80, 112, 112]`. Depth, height and width must be
//! multiples of 16 (four stride-2 downsamplings, then additive skips). The reference code feeds
//! its arrays as `[B, C, x, y, z]`; a network trained there sees axes in the opposite order, so
//! to reuse such a checkpoint permute the input with `x.permute([0, 1, 4, 3, 2])` (and the output
//! back) — the weights themselves transfer unchanged.
//!
//! Parameter and buffer names are the PyTorch state-dict keys (`block_one.conv.0.weight`,
//! `block_one.conv.1.running_mean`, `block_one.conv.1.num_batches_tracked`, `block_one_dw.conv.0.weight`,
//! ..., `out_conv.weight`, heads `out_conv_six`, `out_conv_seven`, `out_conv_eight`), so a
//! state dict moves one to one in both directions, `load_state_dict(..., strict=True)` included.
use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::nn::weights::{read_safetensors_with_metadata, save_safetensors};

mod folded;
pub use folded::FoldedVNet;

/// Architecture of a V-Net. Serialised into model files, so unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VNetConfig {
    /// Input channels (1 for a grey volume).
    pub in_channels: i64,
    /// Output classes, background included.
    pub num_classes: i64,
    /// Channels of the first stage; doubled at each downsampling (16 in the paper).
    pub n_filters: i64,
    /// Adds the three deep-supervision heads (see [`VNet::f_forward_with_aux`]).
    pub deep_supervision: bool,
    /// Dropout3d probability at the bottleneck and before the head; `None` for no dropout.
    /// Only active when forwarding with `train = true`.
    pub dropout: Option<f64>,
}

impl Default for VNetConfig {
    fn default() -> Self {
        VNetConfig { in_channels: 1, num_classes: 2, n_filters: 16, deep_supervision: false, dropout: Some(0.5) }
    }
}

impl VNetConfig {
    pub fn validate(&self) -> Result<()> {
        if self.in_channels < 1 {
            return Err(Error::invalid(format!("V-Net: in_channels must be at least 1, got {}", self.in_channels)));
        }
        if self.num_classes < 1 {
            return Err(Error::invalid(format!("V-Net: num_classes must be at least 1, got {}", self.num_classes)));
        }
        if self.n_filters < 1 {
            return Err(Error::invalid(format!("V-Net: n_filters must be at least 1, got {}", self.n_filters)));
        }
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::invalid(format!("V-Net: dropout probability must be in [0, 1), got {p}")));
            }
        }
        Ok(())
    }
}

/// Collects variables under their state-dict keys, in PyTorch's registration order.
struct Builder<'a, 'p> {
    root: &'p nn::Path<'a>,
    state: Vec<(String, Tensor)>,
    n_params: i64,
}

impl<'a, 'p> Builder<'a, 'p> {
    fn path(&self, key: &str) -> (nn::Path<'a>, String) {
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().expect("non-empty key").to_string();
        let mut p = self.root.sub(parts[0]);
        for part in &parts[1..] {
            p = p.sub(*part);
        }
        (p, leaf)
    }

    fn var(&mut self, key: &str, dims: &[i64], init: Init) -> Tensor {
        let (p, leaf) = self.path(key);
        let t = p.var(&leaf, dims, init);
        self.n_params += dims.iter().product::<i64>();
        self.state.push((key.to_string(), t.shallow_clone()));
        t
    }

    fn buffer(&mut self, key: &str, init: Tensor) -> Tensor {
        let (p, leaf) = self.path(key);
        let t = p.add(&leaf, init.to_device(p.device()), false);
        self.state.push((key.to_string(), t.shallow_clone()));
        t
    }
}

/// Conv3d or ConvTranspose3d with bias, PyTorch's default initialisation.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    transposed: bool,
}

impl Conv {
    fn new(b: &mut Builder, key: &str, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64, transposed: bool) -> Conv {
        // PyTorch stores transposed-conv weights as [in, out, k, k, k] and takes fan-in from
        // dimension 1 in both cases; kaiming_uniform(a = √5) then gives a bound of 1/√fan_in.
        let dims = if transposed { [c_in, c_out, k, k, k] } else { [c_out, c_in, k, k, k] };
        let bound = 1.0 / ((dims[1] * k * k * k) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = b.var(&format!("{key}.weight"), &dims, init);
        let bias = b.var(&format!("{key}.bias"), &[c_out], init);
        Conv { weight, bias, stride, padding, transposed }
    }

    fn forward(&self, x: &Tensor, kind: Option<Kind>) -> Tensor {
        // Mixed precision: the f32 master weights are cast on the fly so gradients reach them.
        let (w, bias) = match kind {
            Some(k) => (self.weight.to_kind(k), self.bias.to_kind(k)),
            None => (self.weight.shallow_clone(), self.bias.shallow_clone()),
        };
        let s = [self.stride; 3];
        let p = [self.padding; 3];
        if self.transposed {
            x.conv_transpose3d(&w, Some(&bias), s, p, [0i64; 3], 1, [1i64; 3])
        } else {
            x.conv3d(&w, Some(&bias), s, p, [1i64; 3], 1)
        }
    }
}

/// BatchNorm3d with PyTorch's defaults (eps 1e-5, momentum 0.1, affine, running statistics).
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm {
    fn new(b: &mut Builder, key: &str, c: i64) -> BatchNorm {
        let weight = b.var(&format!("{key}.weight"), &[c], Init::Const(1.0));
        let bias = b.var(&format!("{key}.bias"), &[c], Init::Const(0.0));
        let running_mean = b.buffer(&format!("{key}.running_mean"), Tensor::zeros([c], (Kind::Float, Device::Cpu)));
        let running_var = b.buffer(&format!("{key}.running_var"), Tensor::ones([c], (Kind::Float, Device::Cpu)));
        // Not used with a fixed momentum, but part of every PyTorch state dict (strict loading).
        let num_batches_tracked = b.buffer(&format!("{key}.num_batches_tracked"), Tensor::zeros([], (Kind::Int64, Device::Cpu)));
        BatchNorm { weight, bias, running_mean, running_var, num_batches_tracked }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        // Parameters stay f32 under bf16 activations: libtorch's batch norm takes mixed types and
        // keeps the statistics in f32, as autocast would.
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            1e-5,
            true,
        )
    }
}

/// `conv` of the reference blocks: a `Sequential` of [conv, BN, ReLU] triples, so conv `i` is
/// `conv.{3i}` and its BN `conv.{3i+1}`.
#[derive(Debug)]
struct Block {
    layers: Vec<(Conv, BatchNorm)>,
}

impl Block {
    /// `n` convs 3³ (ConvBlock).
    fn convs(b: &mut Builder, name: &str, n: usize, c_in: i64, c_out: i64) -> Block {
        let layers = (0..n)
            .map(|i| {
                let ci = if i == 0 { c_in } else { c_out };
                let conv = Conv::new(b, &format!("{name}.conv.{}", 3 * i), ci, c_out, 3, 1, 1, false);
                let bn = BatchNorm::new(b, &format!("{name}.conv.{}", 3 * i + 1), c_out);
                (conv, bn)
            })
            .collect();
        Block { layers }
    }

    /// Stride-2 2³ conv (DownsamplingConvBlock) or transposed conv (UpsamplingDeconvBlock).
    fn resample(b: &mut Builder, name: &str, c_in: i64, c_out: i64, transposed: bool) -> Block {
        let conv = Conv::new(b, &format!("{name}.conv.0"), c_in, c_out, 2, 2, 0, transposed);
        let bn = BatchNorm::new(b, &format!("{name}.conv.1"), c_out);
        Block { layers: vec![(conv, bn)] }
    }

    fn forward(&self, x: &Tensor, train: bool, kind: Option<Kind>) -> Tensor {
        let mut x = x.shallow_clone();
        for (conv, bn) in &self.layers {
            x = bn.forward(&conv.forward(&x, kind), train).relu();
        }
        x
    }
}

/// The V-Net. Build it in a `VarStore` path; its variables live there (so `nn::Sgd` and friends
/// see them) and BatchNorm running statistics are non-trainable variables of the same store.
#[derive(Debug)]
pub struct VNet {
    config: VNetConfig,
    block_one: Block,
    block_one_dw: Block,
    block_two: Block,
    block_two_dw: Block,
    block_three: Block,
    block_three_dw: Block,
    block_four: Block,
    block_four_dw: Block,
    block_five: Block,
    block_five_up: Block,
    block_six: Block,
    block_six_up: Block,
    block_seven: Block,
    block_seven_up: Block,
    block_eight: Block,
    block_eight_up: Block,
    block_nine: Block,
    out_conv: Conv,
    /// Heads on the outputs of block_six, block_seven and block_eight.
    aux_heads: Vec<Conv>,
    /// State-dict keys (relative to the V-Net's path) and their tensors, in PyTorch's order.
    state: Vec<(String, Tensor)>,
    n_params: i64,
    device: Device,
    bf16: bool,
}

impl VNet {
    pub fn new(p: &nn::Path, config: &VNetConfig) -> Result<VNet> {
        config.validate()?;
        let f = config.n_filters;
        let mut b = Builder { root: p, state: Vec::new(), n_params: 0 };
        let b = &mut b;
        let block_one = Block::convs(b, "block_one", 1, config.in_channels, f);
        let block_one_dw = Block::resample(b, "block_one_dw", f, 2 * f, false);
        let block_two = Block::convs(b, "block_two", 2, 2 * f, 2 * f);
        let block_two_dw = Block::resample(b, "block_two_dw", 2 * f, 4 * f, false);
        let block_three = Block::convs(b, "block_three", 3, 4 * f, 4 * f);
        let block_three_dw = Block::resample(b, "block_three_dw", 4 * f, 8 * f, false);
        let block_four = Block::convs(b, "block_four", 3, 8 * f, 8 * f);
        let block_four_dw = Block::resample(b, "block_four_dw", 8 * f, 16 * f, false);
        let block_five = Block::convs(b, "block_five", 3, 16 * f, 16 * f);
        let block_five_up = Block::resample(b, "block_five_up", 16 * f, 8 * f, true);
        let block_six = Block::convs(b, "block_six", 3, 8 * f, 8 * f);
        let block_six_up = Block::resample(b, "block_six_up", 8 * f, 4 * f, true);
        let block_seven = Block::convs(b, "block_seven", 3, 4 * f, 4 * f);
        let block_seven_up = Block::resample(b, "block_seven_up", 4 * f, 2 * f, true);
        let block_eight = Block::convs(b, "block_eight", 2, 2 * f, 2 * f);
        let block_eight_up = Block::resample(b, "block_eight_up", 2 * f, f, true);
        let block_nine = Block::convs(b, "block_nine", 1, f, f);
        let nc = config.num_classes;
        let out_conv = Conv::new(b, "out_conv", f, nc, 1, 1, 0, false);
        let aux_heads = if config.deep_supervision {
            vec![
                Conv::new(b, "out_conv_six", 8 * f, nc, 1, 1, 0, false),
                Conv::new(b, "out_conv_seven", 4 * f, nc, 1, 1, 0, false),
                Conv::new(b, "out_conv_eight", 2 * f, nc, 1, 1, 0, false),
            ]
        } else {
            Vec::new()
        };
        let state = std::mem::take(&mut b.state);
        let n_params = b.n_params;
        Ok(VNet {
            config: config.clone(),
            block_one,
            block_one_dw,
            block_two,
            block_two_dw,
            block_three,
            block_three_dw,
            block_four,
            block_four_dw,
            block_five,
            block_five_up,
            block_six,
            block_six_up,
            block_seven,
            block_seven_up,
            block_eight,
            block_eight_up,
            block_nine,
            out_conv,
            aux_heads,
            state,
            n_params,
            device: p.device(),
            bf16: false,
        })
    }

    pub fn config(&self) -> &VNetConfig {
        &self.config
    }

    /// Trainable parameters (BatchNorm affine included, running statistics not), as PyTorch's
    /// `sum(p.numel() for p in model.parameters())`.
    pub fn num_parameters(&self) -> i64 {
        self.n_params
    }

    /// bf16 mixed precision: activations and conv weights in bf16, master weights, BatchNorm
    /// statistics and the returned logits in f32. Meant for CUDA (on CPUs without bf16 units it
    /// runs, slowly). libtorch's autocast, as exposed by tch, can only select f16 on CUDA, whose
    /// narrow range needs loss scaling; bf16 does not, hence this explicit cast.
    pub fn set_bf16(&mut self, on: bool) {
        self.bf16 = on;
    }

    pub fn bf16(&self) -> bool {
        self.bf16
    }

    /// Why `x` cannot go through the network, if it cannot.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let size = x.size();
        if size.len() != 5 {
            return Err(Error::invalid(format!(
                "V-Net input must be [batch, channels, nz, ny, nx], got shape {size:?}"
            )));
        }
        if size[1] != self.config.in_channels {
            return Err(Error::invalid(format!(
                "V-Net input has {} channels, the network expects {} (shape {size:?})",
                size[1], self.config.in_channels
            )));
        }
        if size[0] < 1 || size[2..].iter().any(|&s| s < 16 || s % 16 != 0) {
            return Err(Error::invalid(format!(
                "V-Net input [batch, channels, nz, ny, nx] = {size:?}: the batch must be non-empty and nz, ny, nx \
                 positive multiples of 16 (four stride-2 downsamplings with additive skips)"
            )));
        }
        if !x.is_floating_point() {
            return Err(Error::invalid(format!("V-Net input must be a floating-point tensor, got {:?}", x.kind())));
        }
        if x.device() != self.device {
            return Err(Error::invalid(format!(
                "V-Net input is on {:?} but the network's weights are on {:?}",
                x.device(),
                self.device
            )));
        }
        Ok(())
    }

    /// Logits `[B, num_classes, nz, ny, nx]` (f32) for `x` `[B, in_channels, nz, ny, nx]`.
    /// `train` selects batch statistics (updating the running ones) and active dropout.
    pub fn f_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        Ok(self.run(x, train, false).0)
    }

    /// Logits and the deep-supervision logits, the latter ordered from coarsest to finest
    /// (heads on block_six, block_seven, block_eight), each upsampled trilinearly
    /// (align_corners = false) to `[B, num_classes, nz, ny, nx]`.
    pub fn f_forward_with_aux(&self, x: &Tensor, train: bool) -> Result<(Tensor, Vec<Tensor>)> {
        if self.aux_heads.is_empty() {
            return Err(Error::invalid(
                "V-Net: deep-supervision outputs requested from a network built without deep_supervision",
            ));
        }
        self.check_input(x)?;
        Ok(self.run(x, train, true))
    }

    fn run(&self, x: &Tensor, train: bool, with_aux: bool) -> (Tensor, Vec<Tensor>) {
        let kind = if self.bf16 { Some(Kind::BFloat16) } else { None };
        let x = x.to_kind(kind.unwrap_or_else(|| self.out_conv.weight.kind()));
        let dropout = |t: Tensor| match self.config.dropout {
            Some(p) if p > 0.0 => t.feature_dropout(p, train),
            _ => t,
        };
        let x1 = self.block_one.forward(&x, train, kind);
        let x2 = self.block_two.forward(&self.block_one_dw.forward(&x1, train, kind), train, kind);
        let x3 = self.block_three.forward(&self.block_two_dw.forward(&x2, train, kind), train, kind);
        let x4 = self.block_four.forward(&self.block_three_dw.forward(&x3, train, kind), train, kind);
        let x5 = self.block_five.forward(&self.block_four_dw.forward(&x4, train, kind), train, kind);
        let x5 = dropout(x5);
        let x6 = self.block_six.forward(&(self.block_five_up.forward(&x5, train, kind) + &x4), train, kind);
        let x7 = self.block_seven.forward(&(self.block_six_up.forward(&x6, train, kind) + &x3), train, kind);
        let x8 = self.block_eight.forward(&(self.block_seven_up.forward(&x7, train, kind) + &x2), train, kind);
        let x9 = self.block_nine.forward(&(self.block_eight_up.forward(&x8, train, kind) + &x1), train, kind);
        let x9 = dropout(x9);
        let out = self.out_conv.forward(&x9, kind).to_kind(Kind::Float);
        if !with_aux {
            return (out, Vec::new());
        }
        let size = x.size()[2..].to_vec();
        let aux = self
            .aux_heads
            .iter()
            .zip([&x6, &x7, &x8])
            .map(|(head, feat)| {
                head.forward(feat, kind)
                    .upsample_trilinear3d(&size, false, None, None, None)
                    .to_kind(Kind::Float)
            })
            .collect();
        (out, aux)
    }

    /// Sets the head's bias (`out_conv.bias`) to `bias`, one value per class.
    pub fn set_head_bias(&self, bias: &[f32]) -> Result<()> {
        if bias.len() as i64 != self.config.num_classes {
            return Err(Error::invalid(format!("head bias: {} values for {} classes", bias.len(), self.config.num_classes)));
        }
        tch::no_grad(|| self.out_conv.bias.shallow_clone().copy_(&Tensor::from_slice(bias).to_device(self.device)));
        Ok(())
    }

    /// The state dict: PyTorch keys and the live tensors (shallow clones: writing to them writes
    /// to the network), parameters and buffers in PyTorch's order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.state.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    }

    /// Copies a state dict into the network, strictly: every key must be present with its shape,
    /// no key may be left over. Two leniencies, both PyTorch's own: a missing
    /// `num_batches_tracked` becomes 0 (older checkpoints lack it), and a `module.` prefix on
    /// every key (a model saved under `DataParallel`) is dropped. Values are converted to the
    /// network's dtype and device. `source` names the origin in error messages.
    pub fn load_state_dict(&mut self, tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
        self.copy_state(tensors).map_err(|msg| Error::invalid(format!("{source}: {msg}")))
    }

    fn copy_state(&mut self, tensors: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        let ours: HashSet<&str> = self.state.iter().map(|(k, _)| k.as_str()).collect();
        let strip = !tensors.is_empty()
            && tensors.iter().all(|(k, _)| k.starts_with("module."))
            && !tensors.iter().any(|(k, _)| ours.contains(k.as_str()));
        let mut given: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
        for (k, t) in tensors {
            let k = if strip { k["module.".len()..].to_string() } else { k };
            given.insert(k, t);
        }
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for (k, t) in &self.state {
            match given.get(k) {
                None if k.ends_with(".num_batches_tracked") => {}
                None => missing.push(k.clone()),
                Some(src) if src.size() != t.size() => {
                    wrong.push(format!("{k} (file {:?}, network {:?})", src.size(), t.size()))
                }
                Some(_) => {}
            }
        }
        let mut unexpected: Vec<String> = given.keys().filter(|k| !ours.contains(k.as_str())).cloned().collect();
        unexpected.sort();
        if !(missing.is_empty() && wrong.is_empty() && unexpected.is_empty()) {
            let mut parts = Vec::new();
            let list = |v: &[String]| {
                let shown: Vec<&str> = v.iter().take(8).map(|s| s.as_str()).collect();
                let more = if v.len() > 8 { format!(", ... ({} in all)", v.len()) } else { String::new() };
                format!("{}{more}", shown.join(", "))
            };
            if !missing.is_empty() {
                parts.push(format!("missing keys: {}", list(&missing)));
            }
            if !unexpected.is_empty() {
                let hint = if !self.config.deep_supervision && unexpected.iter().any(|k| k.starts_with("out_conv_")) {
                    " (the weights have deep-supervision heads: build with deep_supervision = true)"
                } else {
                    ""
                };
                parts.push(format!("unexpected keys: {}{hint}", list(&unexpected)));
            }
            if !wrong.is_empty() {
                parts.push(format!("shape mismatch: {}", list(&wrong)));
            }
            return Err(format!(
                "not the weights of this V-Net ({:?}): {}",
                self.config,
                parts.join("; ")
            ));
        }
        tch::no_grad(|| {
            for (k, dst) in &self.state {
                let mut dst = dst.shallow_clone();
                let r = match given.get(k) {
                    Some(src) => dst.f_copy_(&src.to_device(self.device)),
                    None => dst.f_fill_(0).map(|_| ()),
                };
                r.map_err(|e| format!("{k}: {e}"))?;
            }
            Ok(())
        })
    }

    /// Writes the state dict as safetensors (what `safetensors.torch.load_file` +
    /// `load_state_dict(strict=True)` reads), with optional string metadata. The file appears
    /// whole or not at all (see [`save_safetensors`]).
    pub fn save_safetensors(&self, path: impl AsRef<Path>, metadata: Option<HashMap<String, String>>) -> Result<()> {
        save_safetensors(path, &self.state, &metadata.unwrap_or_default())
    }

    /// Loads weights written by [`VNet::save_safetensors`] or by PyTorch
    /// (`save_file(model.state_dict())`), strictly as [`VNet::load_state_dict`]; returns the
    /// file's metadata (empty when it has none).
    pub fn load_safetensors(&mut self, path: impl AsRef<Path>) -> Result<HashMap<String, String>> {
        let path = path.as_ref();
        let (tensors, metadata) = read_safetensors_with_metadata(path)?;
        self.copy_state(tensors).map_err(|msg| Error::format(path, msg))?;
        Ok(metadata)
    }
}

impl nn::ModuleT for VNet {
    /// Panics on an input [`VNet::check_input`] rejects; use [`VNet::f_forward_t`] where the
    /// input is not known to be well formed.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }
}

