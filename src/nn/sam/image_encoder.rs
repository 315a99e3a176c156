//! SAM's ViT image encoder (`modeling/image_encoder.py`): patch embedding, absolute position
//! embedding, blocks with windowed or global attention and decomposed relative position bias,
//! and the convolutional neck.
use crate::nn::layers::{Activation, Conv2d, InitRule, LayerNorm, LayerNorm2d, Linear, MlpBlock, Params};
use super::config::SamConfig;
use crate::nn::lora::{Lora, LoraBlock};
use tch::{Kind, Tensor};

/// Multi-head attention with relative position embeddings (`rel_pos_h`, `rel_pos_w`).
#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub rel_pos_h: Tensor,
    pub rel_pos_w: Tensor,
    num_heads: i64,
    scale: f64,
}

impl Attention {
    /// `input_size` is the token grid the relative tables are sized for: the window for windowed
    /// blocks, the whole grid for global ones.
    fn new(p: &Params, dim: i64, num_heads: i64, input_size: (i64, i64)) -> Self {
        let head_dim = dim / num_heads;
        Attention {
            qkv: Linear::new(&p.sub("qkv"), dim, dim * 3, true),
            proj: Linear::new(&p.sub("proj"), dim, dim, true),
            rel_pos_h: p.param("rel_pos_h", &[2 * input_size.0 - 1, head_dim], InitRule::Zeros),
            rel_pos_w: p.param("rel_pos_w", &[2 * input_size.1 - 1, head_dim], InitRule::Zeros),
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// x: [B, H, W, C] -> [B, H, W, C].
    fn forward(&self, x: &Tensor, lora: Option<&LoraBlock>) -> Tensor {
        let (b, h, w, _) = x.size4().expect("attention input is [B, H, W, C]");
        let mut qkv = self.qkv.forward(x);
        if let Some(l) = lora {
            qkv = l.add_to_qkv(qkv, x);
        }
        // [3, B * heads, H * W, head_dim]
        let qkv = qkv.reshape([b, h * w, 3, self.num_heads, -1]).permute([2, 0, 3, 1, 4]).reshape([3, b * self.num_heads, h * w, -1]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (&q * self.scale).matmul(&k.transpose(-2, -1));
        let attn = add_decomposed_rel_pos(&attn, &q, &self.rel_pos_h, &self.rel_pos_w, (h, w), (h, w));
        let attn = attn.softmax(-1, None::<Kind>);
        let x = attn.matmul(&v).view([b, self.num_heads, h, w, -1]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, -1]);
        self.proj.forward(&x)
    }
}

/// Relative position embeddings for every (query, key) offset along one axis:
/// `[q_size, k_size, C]`. A table of another length is resized linearly on the fly, exactly as
/// the official `get_rel_pos` does.
pub fn get_rel_pos(q_size: i64, k_size: i64, rel_pos: &Tensor) -> Tensor {
    let max_rel_dist = 2 * q_size.max(k_size) - 1;
    let resized = if rel_pos.size()[0] != max_rel_dist {
        let l = rel_pos.size()[0];
        rel_pos
            .reshape([1, l, -1])
            .permute([0, 2, 1])
            .upsample_linear1d([max_rel_dist], false, None)
            .reshape([-1, max_rel_dist])
            .permute([1, 0])
    } else {
        rel_pos.shallow_clone()
    };
    let (qf, kf) = (q_size as f64, k_size as f64);
    let q_scale = (kf / qf).max(1.0);
    let k_scale = (qf / kf).max(1.0);
    // Same arithmetic as the reference (float coordinates truncated to integers).
    let mut idx = Vec::with_capacity((q_size * k_size) as usize);
    for i in 0..q_size {
        for j in 0..k_size {
            let c = (i as f64 * q_scale - j as f64 * k_scale) + (kf - 1.0) * k_scale;
            idx.push(c as i64);
        }
    }
    let idx = Tensor::from_slice(&idx).to_device(rel_pos.device());
    resized.index_select(0, &idx).view([q_size, k_size, -1])
}

/// MViTv2's decomposed relative position bias added to the attention logits.
/// attn: [B, q_h*q_w, k_h*k_w]; q: [B, q_h*q_w, C].
pub fn add_decomposed_rel_pos(attn: &Tensor, q: &Tensor, rel_pos_h: &Tensor, rel_pos_w: &Tensor, q_size: (i64, i64), k_size: (i64, i64)) -> Tensor {
    let (q_h, q_w) = q_size;
    let (k_h, k_w) = k_size;
    let rh = get_rel_pos(q_h, k_h, rel_pos_h);
    let rw = get_rel_pos(q_w, k_w, rel_pos_w);
    let (b, _, dim) = q.size3().expect("q is [B, N, C]");
    let r_q = q.reshape([b, q_h, q_w, dim]);
    let rel_h = Tensor::einsum("bhwc,hkc->bhwk", &[&r_q, &rh], None::<&[i64]>);
    let rel_w = Tensor::einsum("bhwc,wkc->bhwk", &[&r_q, &rw], None::<&[i64]>);
    (attn.view([b, q_h, q_w, k_h, k_w]) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).view([b, q_h * q_w, k_h * k_w])
}

/// Split [B, H, W, C] into windows [B * nW, ws, ws, C], zero-padding H and W up to multiples of
/// the window size. Returns the padded size too.
pub fn window_partition(x: &Tensor, ws: i64) -> (Tensor, (i64, i64)) {
    let (b, h, w, c) = x.size4().expect("[B, H, W, C]");
    let pad_h = (ws - h % ws) % ws;
    let pad_w = (ws - w % ws) % ws;
    let x = if pad_h > 0 || pad_w > 0 { x.constant_pad_nd([0, 0, 0, pad_w, 0, pad_h]) } else { x.shallow_clone() };
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = x.view([b, hp / ws, ws, wp / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).contiguous().view([-1, ws, ws, c]);
    (windows, (hp, wp))
}

/// Inverse of [`window_partition`], dropping the padding.
pub fn window_unpartition(windows: &Tensor, ws: i64, pad_hw: (i64, i64), hw: (i64, i64)) -> Tensor {
    let (hp, wp) = pad_hw;
    let (h, w) = hw;
    let b = windows.size()[0] / (hp * wp / ws / ws);
    let x = windows.view([b, hp / ws, wp / ws, ws, ws, -1]).permute([0, 1, 3, 2, 4, 5]).contiguous().view([b, hp, wp, -1]);
    if hp > h || wp > w {
        x.narrow(1, 0, h).narrow(2, 0, w).contiguous()
    } else {
        x
    }
}

/// A transformer block; `window_size` 0 means global attention.
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub window_size: i64,
}

impl Block {
    fn new(p: &Params, cfg: &SamConfig, window_size: i64) -> Self {
        let dim = cfg.encoder_embed_dim;
        let grid = cfg.grid_size();
        let input_size = if window_size == 0 { (grid, grid) } else { (window_size, window_size) };
        Block {
            norm1: LayerNorm::new(&p.sub("norm1"), dim, 1e-6),
            attn: Attention::new(&p.sub("attn"), dim, cfg.encoder_num_heads, input_size),
            norm2: LayerNorm::new(&p.sub("norm2"), dim, 1e-6),
            mlp: MlpBlock::new(&p.sub("mlp"), dim, (dim as f64 * cfg.mlp_ratio) as i64, Activation::Gelu),
            window_size,
        }
    }

    fn forward(&self, x: &Tensor, lora: Option<&LoraBlock>) -> Tensor {
        let shortcut = x;
        let mut x = self.norm1.forward(x);
        let (h, w) = (x.size()[1], x.size()[2]);
        if self.window_size > 0 {
            let (windows, pad_hw) = window_partition(&x, self.window_size);
            let y = self.attn.forward(&windows, lora);
            x = window_unpartition(&y, self.window_size, pad_hw, (h, w));
        } else {
            x = self.attn.forward(&x, lora);
        }
        let x = shortcut + x;
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// `ImageEncoderViT`: [B, 3, S, S] -> image embedding [B, out_chans, S/16, S/16].
#[derive(Debug)]
pub struct ImageEncoderViT {
    pub patch_embed: Conv2d,
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub neck0: Conv2d,
    pub neck1: LayerNorm2d,
    pub neck2: Conv2d,
    pub neck3: LayerNorm2d,
}

impl ImageEncoderViT {
    pub fn new(p: &Params, cfg: &SamConfig) -> Self {
        let dim = cfg.encoder_embed_dim;
        let grid = cfg.grid_size();
        let patch_embed = Conv2d::new(&p.sub("patch_embed").sub("proj"), cfg.in_chans, dim, cfg.patch_size, cfg.patch_size, 0, true);
        let pos_embed = p.param("pos_embed", &[1, grid, grid, dim], InitRule::Zeros);
        let blocks = (0..cfg.encoder_depth)
            .map(|i| {
                let ws = if cfg.encoder_global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                Block::new(&p.sub("blocks").sub(i), cfg, ws)
            })
            .collect();
        let out = cfg.prompt_embed_dim;
        let neck = p.sub("neck");
        ImageEncoderViT {
            patch_embed,
            pos_embed,
            blocks,
            neck0: Conv2d::new(&neck.sub(0), dim, out, 1, 1, 0, false),
            neck1: LayerNorm2d::new(&neck.sub(1), out),
            neck2: Conv2d::new(&neck.sub(2), out, out, 3, 1, 1, false),
            neck3: LayerNorm2d::new(&neck.sub(3), out),
        }
    }

    /// `lora`, when given, adds its low-rank update to every block's fused qkv projection.
    pub fn forward(&self, x: &Tensor, lora: Option<&Lora>) -> Tensor {
        let n = self.blocks.len();
        self.suffix(&self.prefix(x, lora, n), lora, n)
    }

    /// The tokens [B, g, g, C] before block `upto` (patch embedding and position embedding,
    /// then blocks `..upto`); `suffix` continues from them, so a frozen prefix can be cached.
    pub fn prefix(&self, x: &Tensor, lora: Option<&Lora>, upto: usize) -> Tensor {
        let mut x = self.patch_embed.forward(x).permute([0, 2, 3, 1]) + &self.pos_embed;
        for (i, blk) in self.blocks.iter().enumerate().take(upto) {
            x = blk.forward(&x, lora.map(|l| &l.blocks[i]));
        }
        x
    }

    /// Blocks `from..` and the neck on the tokens `prefix(.., from)` returned.
    pub fn suffix(&self, tokens: &Tensor, lora: Option<&Lora>, from: usize) -> Tensor {
        let mut x = tokens.shallow_clone();
        for (i, blk) in self.blocks.iter().enumerate().skip(from) {
            x = blk.forward(&x, lora.map(|l| &l.blocks[i]));
        }
        let x = x.permute([0, 3, 1, 2]);
        let x = self.neck1.forward(&self.neck0.forward(&x));
        self.neck3.forward(&self.neck2.forward(&x))
    }
}
