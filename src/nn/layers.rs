//! Building blocks shared by the SAM modules and LoRA, and the registry that gives every tensor
//! the key it has in the official PyTorch state dict. (Below `sam` and `lora`, so that LoRA
//! needs nothing of SAM.)
//!
//! Each tensor is created through [`Params`], which both creates it in the caller's
//! `tch::nn::VarStore` (under the caller's path) and records it with its state-dict key relative
//! to the model root and its PyTorch default initialisation. Loading a checkpoint, freezing the
//! image encoder, re-initialising decoder heads and counting parameters all work on that record,
//! so they do not depend on where in a VarStore the model was placed.
use std::cell::RefCell;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};

/// How PyTorch initialises a tensor by default; kept so a tensor can be re-initialised later.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitRule {
    Zeros,
    Ones,
    /// N(0, std²): `nn.Embedding`, the random-Fourier matrix.
    Normal(f64),
    /// U(-bound, bound): `nn.Linear` / `nn.Conv2d` weights and biases (bound = 1/sqrt(fan_in)).
    Uniform(f64),
}

impl InitRule {
    /// A fresh tensor drawn with this rule.
    pub fn sample(self, dims: &[i64], kind: Kind, device: tch::Device) -> Tensor {
        match self {
            InitRule::Zeros => Tensor::zeros(dims, (kind, device)),
            InitRule::Ones => Tensor::ones(dims, (kind, device)),
            InitRule::Normal(std) => Tensor::randn(dims, (kind, device)) * std,
            InitRule::Uniform(b) => Tensor::zeros(dims, (kind, device)).uniform_(-b, b),
        }
    }
}

/// One tensor of a model: its state-dict key (relative to the model root), the tensor itself
/// (shared with the VarStore), how it was initialised, and whether PyTorch counts it as a
/// buffer rather than a parameter.
#[derive(Debug)]
pub struct ParamEntry {
    pub key: String,
    pub tensor: Tensor,
    pub init: InitRule,
    pub buffer: bool,
}

/// A position in the model tree: a `tch::nn::Path` plus the state-dict key prefix, writing into
/// a shared record of every tensor created below the root.
#[derive(Clone)]
pub struct Params<'a> {
    path: nn::Path<'a>,
    prefix: String,
    record: Rc<RefCell<Vec<ParamEntry>>>,
}

impl<'a> Params<'a> {
    pub fn root(path: &nn::Path<'a>) -> Self {
        Params { path: path.clone(), prefix: String::new(), record: Rc::new(RefCell::new(Vec::new())) }
    }

    pub fn sub<T: ToString>(&self, name: T) -> Self {
        let name = name.to_string();
        Params { path: self.path.sub(&name), prefix: format!("{}{}.", self.prefix, name), record: self.record.clone() }
    }

    pub fn device(&self) -> tch::Device {
        self.path.device()
    }

    /// A trainable parameter.
    pub fn param(&self, name: &str, dims: &[i64], init: InitRule) -> Tensor {
        let t = self.path.var(name, dims, to_tch_init(init));
        self.push(name, &t, init, false);
        t
    }

    /// A persistent buffer (in the state dict, not a parameter, never trained).
    pub fn buffer(&self, name: &str, dims: &[i64], init: InitRule) -> Tensor {
        self.buffer_of_kind(name, dims, init, self.path.kind())
    }

    /// A persistent buffer of a given element type (BatchNorm's int64 `num_batches_tracked`).
    pub fn buffer_of_kind(&self, name: &str, dims: &[i64], init: InitRule, kind: Kind) -> Tensor {
        let t = init.sample(dims, kind, self.path.device());
        let t = self.path.add(name, t, false);
        self.push(name, &t, init, true);
        t
    }

    fn push(&self, name: &str, t: &Tensor, init: InitRule, buffer: bool) {
        self.record.borrow_mut().push(ParamEntry {
            key: format!("{}{}", self.prefix, name),
            tensor: t.shallow_clone(),
            init,
            buffer,
        });
    }

    /// Everything recorded so far (all clones of this `Params` share the record).
    pub fn take_entries(&self) -> Vec<ParamEntry> {
        std::mem::take(&mut *self.record.borrow_mut())
    }
}

fn to_tch_init(i: InitRule) -> nn::Init {
    match i {
        InitRule::Zeros => nn::Init::Const(0.0),
        InitRule::Ones => nn::Init::Const(1.0),
        InitRule::Normal(std) => nn::Init::Randn { mean: 0.0, stdev: std },
        InitRule::Uniform(b) => nn::Init::Uniform { lo: -b, up: b },
    }
}

/// `nn.Linear` with PyTorch's default initialisation (weight and bias U(±1/sqrt(in))).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &Params, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weight = p.param("weight", &[out_dim, in_dim], InitRule::Uniform(bound));
        let bias = bias.then(|| p.param("bias", &[out_dim], InitRule::Uniform(bound)));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.Conv2d` (square kernel, no dilation, no groups) with PyTorch's default initialisation.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(p: &Params, cin: i64, cout: i64, k: i64, stride: i64, padding: i64, bias: bool) -> Self {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let weight = p.param("weight", &[cout, cin, k, k], InitRule::Uniform(bound));
        let bias = bias.then(|| p.param("bias", &[cout], InitRule::Uniform(bound)));
        Conv2d { weight, bias, stride, padding }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

/// `nn.ConvTranspose2d(cin, cout, kernel_size=k, stride=k)` as in the mask decoder's upscaling.
/// PyTorch computes the init fan-in from weight dim 1 (cout) for transposed convolutions.
#[derive(Debug)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Tensor,
    stride: i64,
}

impl ConvTranspose2d {
    pub fn new(p: &Params, cin: i64, cout: i64, k: i64) -> Self {
        let bound = 1.0 / ((cout * k * k) as f64).sqrt();
        let weight = p.param("weight", &[cin, cout, k, k], InitRule::Uniform(bound));
        let bias = p.param("bias", &[cout], InitRule::Uniform(bound));
        ConvTranspose2d { weight, bias, stride: k }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(&self.weight, Some(&self.bias), [self.stride; 2], [0, 0], [0, 0], 1, [1, 1])
    }
}

/// `nn.LayerNorm(dim, eps)` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Params, dim: i64, eps: f64) -> Self {
        let weight = p.param("weight", &[dim], InitRule::Ones);
        let bias = p.param("bias", &[dim], InitRule::Zeros);
        LayerNorm { weight, bias, dim, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// SAM's `LayerNorm2d`: normalisation over the channel dimension of an NCHW tensor (eps 1e-6),
/// written out as in `common.py` so the rounding follows the reference.
#[derive(Debug)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    pub fn new(p: &Params, channels: i64) -> Self {
        let weight = p.param("weight", &[channels], InitRule::Ones);
        let bias = p.param("bias", &[channels], InitRule::Zeros);
        LayerNorm2d { weight, bias, eps: 1e-6 }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let u = x.mean_dim(1, true, None);
        let d = x - &u;
        let s = d.pow_tensor_scalar(2).mean_dim(1, true, None);
        let x = d / (s + self.eps).sqrt();
        x * self.weight.view([-1, 1, 1]) + self.bias.view([-1, 1, 1])
    }
}

/// SAM's `MLPBlock`: lin1 -> activation -> lin2.
#[derive(Debug)]
pub struct MlpBlock {
    pub lin1: Linear,
    pub lin2: Linear,
    act: Activation,
}

#[derive(Debug, Clone, Copy)]
pub enum Activation {
    /// `nn.GELU()` (exact erf form).
    Gelu,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
        }
    }
}

impl MlpBlock {
    pub fn new(p: &Params, dim: i64, mlp_dim: i64, act: Activation) -> Self {
        MlpBlock { lin1: Linear::new(&p.sub("lin1"), dim, mlp_dim, true), lin2: Linear::new(&p.sub("lin2"), mlp_dim, dim, true), act }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.lin2.forward(&self.act.apply(&self.lin1.forward(x)))
    }
}

/// The mask decoder's `MLP`: `num_layers` linears with ReLU between them (`layers.{i}`).
#[derive(Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(p: &Params, input_dim: i64, hidden_dim: i64, output_dim: i64, num_layers: i64) -> Self {
        let n = num_layers.max(1) as usize;
        let layers = (0..n)
            .map(|i| {
                let cin = if i == 0 { input_dim } else { hidden_dim };
                let cout = if i + 1 == n { output_dim } else { hidden_dim };
                Linear::new(&p.sub("layers").sub(i), cin, cout, true)
            })
            .collect();
        Mlp { layers }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x);
            if i + 1 < n {
                x = x.relu();
            }
        }
        x
    }
}
