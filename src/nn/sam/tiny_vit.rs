//! TinyViT image encoder as used by MobileSAM and LiteMedSAM (`tiny_vit_sam.py`), with module
//! names equal to the official state-dict keys (`image_encoder.patch_embed.seq.0.c.weight`,
//! `image_encoder.layers.1.blocks.0.attn.attention_biases`, ...), so `lite_medsam.pth` and
//! `mobile_sam.pt` load one to one.
//!
//! Structure: a patch embedding of two Conv2d_BN (LiteMedSAM: 1×1 stride 1, so stage 0 runs at
//! the input resolution; MobileSAM: 3×3 stride 2, a 4× reduction), stage 0 of MBConv blocks,
//! stages 1–3 of TinyViT blocks (windowed attention with a learnt bias per relative offset, a
//! depthwise "local" convolution, an MLP), a PatchMerging between stages, and SAM's neck to
//! `prompt_embed_dim` channels.
//!
//! Differences from the official module, none of which changes an output:
//! - BatchNorm always runs with its running statistics (PyTorch's eval mode): the encoder is
//!   either frozen (LoRA) or, without a checkpoint, trained with BN as a plain affine map, which
//!   keeps a batch of stitched canvases independent of each other.
//! - Spatial sizes are computed from the input instead of from `img_size` (the official forward
//!   hard-codes a 64×64 embedding), so the same weights run at another canvas size whose side
//!   is a multiple of the total stride.
//! - `attention_bias_idxs` (a non-persistent buffer, not in the file) is rebuilt here from the
//!   window size exactly as the official constructor does.
use crate::nn::layers::{Activation, Conv2d, InitRule, LayerNorm, LayerNorm2d, Linear, Params};
use super::config::{SamConfig, TinyVitConfig};
use crate::nn::lora::{Lora, LoraBlock};
use tch::{Kind, Tensor};

/// `nn.Conv2d` with groups and no bias, as inside Conv2d_BN.
#[derive(Debug)]
struct GroupConv {
    weight: Tensor,
    stride: i64,
    padding: i64,
    groups: i64,
}

/// `Conv2d_BN`: a bias-free convolution (`c`) and a BatchNorm2d (`bn`) applied with its running
/// statistics. `bn.num_batches_tracked` (int64) is kept so the state dict maps one to one.
#[derive(Debug)]
pub struct Conv2dBn {
    c: GroupConv,
    pub bn_weight: Tensor,
    pub bn_bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl Conv2dBn {
    #[allow(clippy::too_many_arguments)]
    fn new(p: &Params, cin: i64, cout: i64, k: i64, stride: i64, pad: i64, groups: i64, bn_weight_init: f64) -> Self {
        // PyTorch's default conv init: U(±1/sqrt(fan_in)), fan_in = cin/groups · k².
        let bound = 1.0 / (((cin / groups) * k * k) as f64).sqrt();
        let c = p.sub("c");
        let weight = c.param("weight", &[cout, cin / groups, k, k], InitRule::Uniform(bound));
        let bn = p.sub("bn");
        let bn_w_init = if bn_weight_init == 0.0 { InitRule::Zeros } else { InitRule::Ones };
        let bn_weight = bn.param("weight", &[cout], bn_w_init);
        let bn_bias = bn.param("bias", &[cout], InitRule::Zeros);
        let running_mean = bn.buffer("running_mean", &[cout], InitRule::Zeros);
        let running_var = bn.buffer("running_var", &[cout], InitRule::Ones);
        let _ = bn.buffer_of_kind("num_batches_tracked", &[], InitRule::Zeros, Kind::Int64);
        Conv2dBn { c: GroupConv { weight, stride, padding: pad, groups }, bn_weight, bn_bias, running_mean, running_var }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let c = &self.c;
        let y = x.conv2d(&c.weight, None::<Tensor>, [c.stride; 2], [c.padding; 2], [1, 1], c.groups);
        // eval-mode BatchNorm2d (eps 1e-5), the same kernel PyTorch runs.
        Tensor::batch_norm(&y, Some(&self.bn_weight), Some(&self.bn_bias), Some(&self.running_mean), Some(&self.running_var), false, 0.1, 1e-5, false)
    }
}

fn gelu(x: &Tensor) -> Tensor {
    Activation::Gelu.apply(x)
}

/// `PatchEmbed`: `seq.0` Conv2d_BN, GELU, `seq.2` Conv2d_BN.
#[derive(Debug)]
pub struct PatchEmbed {
    seq0: Conv2dBn,
    seq2: Conv2dBn,
}

impl PatchEmbed {
    fn new(p: &Params, in_chans: i64, dim: i64, k: i64, stride: i64) -> Self {
        let s = p.sub("seq");
        let pad = k / 2;
        PatchEmbed { seq0: Conv2dBn::new(&s.sub(0), in_chans, dim / 2, k, stride, pad, 1, 1.0), seq2: Conv2dBn::new(&s.sub(2), dim / 2, dim, k, stride, pad, 1, 1.0) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.seq2.forward(&gelu(&self.seq0.forward(x)))
    }
}

/// `MBConv`: 1×1 expand, 3×3 depthwise, 1×1 project (BN weight 0 at init), residual, GELU.
#[derive(Debug)]
pub struct MbConv {
    conv1: Conv2dBn,
    conv2: Conv2dBn,
    conv3: Conv2dBn,
}

impl MbConv {
    fn new(p: &Params, dim: i64, expand: f64) -> Self {
        let hid = (dim as f64 * expand) as i64;
        MbConv {
            conv1: Conv2dBn::new(&p.sub("conv1"), dim, hid, 1, 1, 0, 1, 1.0),
            conv2: Conv2dBn::new(&p.sub("conv2"), hid, hid, 3, 1, 1, hid, 1.0),
            conv3: Conv2dBn::new(&p.sub("conv3"), hid, dim, 1, 1, 0, 1, 0.0),
        }
    }

    /// x: [B, C, H, W].
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = gelu(&self.conv1.forward(x));
        let y = gelu(&self.conv2.forward(&y));
        let y = self.conv3.forward(&y);
        gelu(&(y + x))
    }
}

/// `PatchMerging`: 1×1 conv to the next width, GELU, 3×3 depthwise conv (stride 1 or 2), GELU,
/// 1×1 conv.
#[derive(Debug)]
pub struct PatchMerging {
    conv1: Conv2dBn,
    conv2: Conv2dBn,
    conv3: Conv2dBn,
}

impl PatchMerging {
    fn new(p: &Params, dim: i64, out: i64, stride: i64) -> Self {
        PatchMerging {
            conv1: Conv2dBn::new(&p.sub("conv1"), dim, out, 1, 1, 0, 1, 1.0),
            conv2: Conv2dBn::new(&p.sub("conv2"), out, out, 3, stride, 1, out, 1.0),
            conv3: Conv2dBn::new(&p.sub("conv3"), out, out, 1, 1, 0, 1, 1.0),
        }
    }

    /// x: [B, C, H, W] -> [B, C', H', W'].
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = gelu(&self.conv1.forward(x));
        let y = gelu(&self.conv2.forward(&y));
        self.conv3.forward(&y)
    }
}

/// The index of every (query, key) pair of a ws×ws window into the table of distinct offsets
/// (|dy|, |dx|), numbered in order of first appearance — the official `attention_bias_idxs`.
/// Returns the indices [ws², ws²] and the number of distinct offsets (ws²).
pub fn attention_bias_idxs(ws: i64) -> (Vec<i64>, i64) {
    let points: Vec<(i64, i64)> = (0..ws).flat_map(|i| (0..ws).map(move |j| (i, j))).collect();
    let mut seen: std::collections::HashMap<(i64, i64), i64> = std::collections::HashMap::new();
    let mut idxs = Vec::with_capacity(points.len() * points.len());
    for p1 in &points {
        for p2 in &points {
            let off = ((p1.0 - p2.0).abs(), (p1.1 - p2.1).abs());
            let n = seen.len() as i64;
            idxs.push(*seen.entry(off).or_insert(n));
        }
    }
    (idxs, seen.len() as i64)
}

/// TinyViT's attention: LayerNorm, fused qkv laid out per head as [q | k | v] (not SAM-ViT's
/// [all q | all k | all v]), scaled dot product plus a learnt bias per relative offset.
#[derive(Debug)]
pub struct Attention {
    pub norm: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub attention_biases: Tensor,
    idxs: Tensor,
    num_heads: i64,
    key_dim: i64,
}

impl Attention {
    fn new(p: &Params, dim: i64, num_heads: i64, ws: i64) -> Self {
        let (idxs, n_off) = attention_bias_idxs(ws);
        let n = ws * ws;
        Attention {
            norm: LayerNorm::new(&p.sub("norm"), dim, 1e-5),
            qkv: trunc_linear(&p.sub("qkv"), dim, 3 * dim),
            proj: trunc_linear(&p.sub("proj"), dim, dim),
            attention_biases: p.param("attention_biases", &[num_heads, n_off], InitRule::Zeros),
            idxs: Tensor::from_slice(&idxs).view([n, n]).to_device(p.device()),
            num_heads,
            key_dim: dim / num_heads,
        }
    }

    /// x: [B, N, C] with N = ws² -> [B, N, C].
    fn forward(&self, x: &Tensor, lora: Option<&LoraBlock>) -> Tensor {
        let (b, n, _) = x.size3().expect("attention input is [B, N, C]");
        let x = self.norm.forward(x);
        let mut qkv = self.qkv.forward(&x);
        if let Some(l) = lora {
            qkv = l.add_to_qkv(qkv, &x);
        }
        let qkv = qkv.view([b, n, self.num_heads, -1]);
        let kd = self.key_dim;
        let q = qkv.narrow(3, 0, kd).permute([0, 2, 1, 3]);
        let k = qkv.narrow(3, kd, kd).permute([0, 2, 1, 3]);
        let v = qkv.narrow(3, 2 * kd, kd).permute([0, 2, 1, 3]);
        let bias = self.attention_biases.index_select(1, &self.idxs.view([-1])).view([self.num_heads, n, n]);
        let attn = q.matmul(&k.transpose(-2, -1)) * (kd as f64).powf(-0.5) + bias;
        let attn = attn.softmax(-1, None::<Kind>);
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, self.num_heads * kd]);
        self.proj.forward(&y)
    }
}

/// `nn.Linear` with TinyViT's `_init_weights` (weight N(0, 0.02²) — a truncated normal in the
/// original, the same to within its ±2 cut-off at this std — bias 0).
fn trunc_linear(p: &Params, cin: i64, cout: i64) -> Linear {
    Linear { weight: p.param("weight", &[cout, cin], InitRule::Normal(0.02)), bias: Some(p.param("bias", &[cout], InitRule::Zeros)) }
}

/// TinyViT's `Mlp`: LayerNorm, fc1, GELU, fc2.
#[derive(Debug)]
pub struct TvMlp {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl TvMlp {
    fn new(p: &Params, dim: i64, hidden: i64) -> Self {
        TvMlp { norm: LayerNorm::new(&p.sub("norm"), dim, 1e-5), fc1: trunc_linear(&p.sub("fc1"), dim, hidden), fc2: trunc_linear(&p.sub("fc2"), hidden, dim) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&gelu(&self.fc1.forward(&self.norm.forward(x))))
    }
}

/// `TinyViTBlock`: windowed attention (zero-padded to whole windows; padded tokens take part as
/// keys, as in the original), residual, depthwise local conv, residual MLP.
#[derive(Debug)]
pub struct TinyVitBlock {
    pub attn: Attention,
    mlp: TvMlp,
    local_conv: Conv2dBn,
    window_size: i64,
}

impl TinyVitBlock {
    fn new(p: &Params, dim: i64, heads: i64, ws: i64, mlp_ratio: f64, local_conv: i64) -> Self {
        TinyVitBlock {
            attn: Attention::new(&p.sub("attn"), dim, heads, ws),
            mlp: TvMlp::new(&p.sub("mlp"), dim, (dim as f64 * mlp_ratio) as i64),
            local_conv: Conv2dBn::new(&p.sub("local_conv"), dim, dim, local_conv, 1, local_conv / 2, dim, 1.0),
            window_size: ws,
        }
    }

    /// x: [B, H·W, C] -> [B, H·W, C].
    fn forward(&self, x: &Tensor, h: i64, w: i64, lora: Option<&LoraBlock>) -> Tensor {
        let (b, l, c) = x.size3().expect("block input is [B, L, C]");
        let ws = self.window_size;
        let y = if h == ws && w == ws {
            self.attn.forward(x, lora)
        } else {
            let y = x.view([b, h, w, c]);
            let (pb, pr) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
            let y = if pb > 0 || pr > 0 { y.constant_pad_nd([0, 0, 0, pr, 0, pb]) } else { y };
            let (ph, pw) = (h + pb, w + pr);
            let (nh, nw) = (ph / ws, pw / ws);
            let win = y.view([b, nh, ws, nw, ws, c]).transpose(2, 3).reshape([b * nh * nw, ws * ws, c]);
            let win = self.attn.forward(&win, lora);
            let y = win.view([b, nh, nw, ws, ws, c]).transpose(2, 3).reshape([b, ph, pw, c]);
            let y = if pb > 0 || pr > 0 { y.narrow(1, 0, h).narrow(2, 0, w).contiguous() } else { y };
            y.view([b, l, c])
        };
        let x = x + y;
        let x = x.transpose(1, 2).reshape([b, c, h, w]);
        let x = self.local_conv.forward(&x).view([b, c, l]).transpose(1, 2);
        &x + self.mlp.forward(&x)
    }
}

/// One stage: MBConv blocks (stage 0) or TinyViT blocks, then an optional PatchMerging.
#[derive(Debug)]
pub enum Stage {
    Conv { blocks: Vec<MbConv>, downsample: Option<PatchMerging> },
    Attn { blocks: Vec<TinyVitBlock>, downsample: Option<PatchMerging> },
}

/// `TinyViT` (SAM variant): [B, 3, S, S] -> image embedding [B, out_chans, S/t, S/t] with t
/// the total stride.
#[derive(Debug)]
pub struct TinyVit {
    pub patch_embed: PatchEmbed,
    pub layers: Vec<Stage>,
    pub neck0: Conv2d,
    pub neck1: LayerNorm2d,
    pub neck2: Conv2d,
    pub neck3: LayerNorm2d,
    /// Attention blocks in order, as (stage, index in stage): what LoRA block i belongs to.
    attention_order: Vec<(usize, usize)>,
}

impl TinyVit {
    pub fn new(p: &Params, cfg: &SamConfig, t: &TinyVitConfig) -> Self {
        let e = &t.embed_dims;
        let n = e.len();
        let patch_embed = PatchEmbed::new(&p.sub("patch_embed"), cfg.in_chans, e[0], t.patch_embed_kernel, t.patch_embed_stride());
        let mut layers = Vec::with_capacity(n);
        let mut attention_order = Vec::new();
        for s in 0..n {
            let lp = p.sub("layers").sub(s);
            let downsample = (s + 1 < n).then(|| PatchMerging::new(&lp.sub("downsample"), e[s], e[s + 1], t.merge_strides[s]));
            let bp = lp.sub("blocks");
            if s == 0 {
                let blocks = (0..t.depths[0]).map(|i| MbConv::new(&bp.sub(i), e[0], t.mbconv_expand_ratio)).collect();
                layers.push(Stage::Conv { blocks, downsample });
            } else {
                let blocks = (0..t.depths[s])
                    .map(|i| {
                        attention_order.push((s, i as usize));
                        TinyVitBlock::new(&bp.sub(i), e[s], t.num_heads[s], t.window_sizes[s], cfg.mlp_ratio, t.local_conv_size)
                    })
                    .collect();
                layers.push(Stage::Attn { blocks, downsample });
            }
        }
        let out = cfg.prompt_embed_dim;
        let neck = p.sub("neck");
        TinyVit {
            patch_embed,
            layers,
            neck0: Conv2d::new(&neck.sub(0), e[n - 1], out, 1, 1, 0, false),
            neck1: LayerNorm2d::new(&neck.sub(1), out),
            neck2: Conv2d::new(&neck.sub(2), out, out, 3, 1, 1, false),
            neck3: LayerNorm2d::new(&neck.sub(3), out),
            attention_order,
        }
    }

    /// The attention modules in LoRA order (stage 1 block 0 first).
    pub fn attentions(&self) -> Vec<&Attention> {
        self.attention_order
            .iter()
            .map(|&(s, i)| match &self.layers[s] {
                Stage::Attn { blocks, .. } => &blocks[i].attn,
                Stage::Conv { .. } => unreachable!("attention blocks live in attention stages"),
            })
            .collect()
    }

    /// The number of attention blocks (stages 1–3), LoRA's blocks in order.
    pub fn num_attention_blocks(&self) -> usize {
        self.attention_order.len()
    }

    pub fn forward(&self, x: &Tensor, lora: Option<&Lora>) -> Tensor {
        let n = self.num_attention_blocks();
        self.suffix(&self.prefix(x, lora, n), lora, n)
    }

    /// The encoder up to attention block `upto` (LoRA order; 0 = patch embedding and the
    /// convolutional stage only): the NCHW state that block would see, after the previous
    /// stage's PatchMerging when `upto` starts a stage. `suffix` continues from it, so a frozen
    /// prefix can be computed once and cached.
    pub fn prefix(&self, x: &Tensor, lora: Option<&Lora>, upto: usize) -> Tensor {
        let mut x = self.patch_embed.forward(x);
        for stage in &self.layers {
            if let Stage::Conv { blocks, downsample } = stage {
                for blk in blocks {
                    x = blk.forward(&x);
                }
                if let Some(d) = downsample {
                    x = d.forward(&x);
                }
            }
        }
        self.attention_blocks(x, lora, 0, upto)
    }

    /// Attention blocks `from..` and the neck on the state `prefix(.., from)` returned.
    pub fn suffix(&self, state: &Tensor, lora: Option<&Lora>, from: usize) -> Tensor {
        let x = self.attention_blocks(state.shallow_clone(), lora, from, self.num_attention_blocks());
        let x = self.neck1.forward(&self.neck0.forward(&x));
        self.neck3.forward(&self.neck2.forward(&x))
    }

    /// Attention blocks `from..to` (LoRA order) on an NCHW state; a stage run to its end is
    /// followed by its PatchMerging.
    fn attention_blocks(&self, mut x: Tensor, lora: Option<&Lora>, from: usize, to: usize) -> Tensor {
        let b = x.size()[0];
        let mut li = 0usize;
        for stage in &self.layers {
            let Stage::Attn { blocks, downsample } = stage else { continue };
            let (first, last) = (li, li + blocks.len());
            li = last;
            if last <= from || first >= to {
                continue;
            }
            // [B, L, C] tokens through the blocks of this stage that lie in from..to.
            let (c, h, w) = (x.size()[1], x.size()[2], x.size()[3]);
            let mut t = x.flatten(2, 3).transpose(1, 2);
            for (i, blk) in blocks.iter().enumerate().take(to - first).skip(from.saturating_sub(first)) {
                t = blk.forward(&t, h, w, lora.map(|l| &l.blocks[first + i]));
            }
            x = t.transpose(1, 2).reshape([b, c, h, w]);
            if to >= last {
                if let Some(d) = downsample {
                    x = d.forward(&x);
                }
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_offsets_follow_first_appearance() {
        let (idxs, n) = attention_bias_idxs(2);
        assert_eq!(n, 4);
        // points (0,0) (0,1) (1,0) (1,1); offsets numbered (0,0)=0, (0,1)=1, (1,0)=2, (1,1)=3.
        assert_eq!(idxs, vec![0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1, 3, 2, 1, 0]);
        assert_eq!(attention_bias_idxs(7).1, 49);
        assert_eq!(attention_bias_idxs(14).1, 196);
    }
}
