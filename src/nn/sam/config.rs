//! The architecture of a SAM model (`SamConfig`, with `TinyVitConfig` for a TinyViT image
//! encoder): the official configurations of `build_sam.py`, MobileSAM and LiteMedSAM, the
//! test-sized `tiny`, and the check that a configuration can be built. The JSON names are the
//! ones stored in model files (`sam_config`).
use crate::error::{Error, Result};
use crate::nn::lora::{QkvBlock, QkvBlocks};
use serde::{Deserialize, Serialize};

/// The architecture of a SAM model. The named constructors give the official configurations
/// (`build_sam.py`) with the official 3 multimask outputs; use [`SamConfig::with_num_classes`]
/// for SFR's per-class decoder and [`SamConfig::with_image_size`] for a smaller input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamConfig {
    /// "vit_b", "vit_l", "vit_h", "tiny", "lite_medsam" or "mobile_sam"; used in messages only.
    pub name: String,
    /// Side of the square input image in pixels (1024 for the official models, 256 for
    /// LiteMedSAM).
    pub image_size: i64,
    /// Input pixels per image-embedding cell along a side: the ViT's patch size, or a TinyViT's
    /// total stride (4 for LiteMedSAM, 16 for MobileSAM).
    pub patch_size: i64,
    pub in_chans: i64,
    pub encoder_embed_dim: i64,
    pub encoder_depth: i64,
    pub encoder_num_heads: i64,
    /// Blocks with global attention; the others use windowed attention.
    pub encoder_global_attn_indexes: Vec<i64>,
    pub window_size: i64,
    pub mlp_ratio: f64,
    /// Channels of the image embedding = prompt embedding = mask-decoder transformer width.
    pub prompt_embed_dim: i64,
    pub mask_in_chans: i64,
    pub decoder_depth: i64,
    pub decoder_num_heads: i64,
    pub decoder_mlp_dim: i64,
    pub iou_head_depth: i64,
    pub iou_head_hidden_dim: i64,
    /// Foreground classes. The decoder is built with `num_multimask_outputs = num_classes`, so it
    /// has `num_classes + 1` mask tokens (background + classes), as in SAMed. The official SAM
    /// is `num_classes = 3` (its three multimask outputs).
    pub num_classes: i64,
    /// A TinyViT image encoder (MobileSAM, LiteMedSAM) instead of the ViT. The `encoder_*`,
    /// `window_size` and `mlp_ratio` fields then only matter through `mlp_ratio` (the TinyViT
    /// blocks' MLP ratio); the others are informative (last stage's width, attention blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny_vit: Option<TinyVitConfig>,
    /// The intensities the image encoder was trained on (absent in older files: z-score).
    #[serde(default)]
    pub pixel_input: PixelInput,
}

/// How a patch's intensities are presented to the image encoder: as its pretrained weights saw
/// them. A frozen pretrained encoder fed another range sees images unlike any it was trained on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PixelInput {
    /// Zero mean, unit variance: the volume's z-score as it is (SAM's own pixel normalisation
    /// gives natural images this range; the `tiny` ViT trains from scratch on it).
    #[default]
    Zscore,
    /// [0, 1]: a patch's 0.5th and 99.5th intensity percentiles map to 0 and 1, clipped; the
    /// canvas padding is 0. LiteMedSAM was trained on images scaled to [0, 1] this way (MedSAM's
    /// pre-processing: MR clipped at the 0.5/99.5 percentiles, min-max scaled, grey repeated to
    /// 3 channels).
    Unit,
}

impl SamConfig {
    fn official(name: &str, embed_dim: i64, depth: i64, num_heads: i64, global: [i64; 4]) -> Self {
        SamConfig {
            name: name.to_string(),
            image_size: 1024,
            patch_size: 16,
            in_chans: 3,
            encoder_embed_dim: embed_dim,
            encoder_depth: depth,
            encoder_num_heads: num_heads,
            encoder_global_attn_indexes: global.to_vec(),
            window_size: 14,
            mlp_ratio: 4.0,
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder_depth: 2,
            decoder_num_heads: 8,
            decoder_mlp_dim: 2048,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            num_classes: 3,
            tiny_vit: None,
            pixel_input: PixelInput::Zscore,
        }
    }

    pub fn vit_b() -> Self {
        Self::official("vit_b", 768, 12, 12, [2, 5, 8, 11])
    }

    pub fn vit_l() -> Self {
        Self::official("vit_l", 1024, 24, 16, [5, 11, 17, 23])
    }

    pub fn vit_h() -> Self {
        Self::official("vit_h", 1280, 32, 16, [7, 15, 23, 31])
    }

    /// A small model for tests: 128-pixel input (8×8 tokens), width 64, 4 blocks (global at 1
    /// and 3), window 3 (so windowed blocks pad 8 to 9), 32-channel embedding and decoder.
    /// `tests/reference/sam_reference.py` builds the same with the official code.
    pub fn tiny() -> Self {
        SamConfig {
            name: "tiny".to_string(),
            image_size: 128,
            patch_size: 16,
            in_chans: 3,
            encoder_embed_dim: 64,
            encoder_depth: 4,
            encoder_num_heads: 2,
            encoder_global_attn_indexes: vec![1, 3],
            window_size: 3,
            mlp_ratio: 4.0,
            prompt_embed_dim: 32,
            mask_in_chans: 16,
            decoder_depth: 2,
            decoder_num_heads: 2,
            decoder_mlp_dim: 64,
            iou_head_depth: 3,
            iou_head_hidden_dim: 32,
            num_classes: 3,
            tiny_vit: None,
            pixel_input: PixelInput::Zscore,
        }
    }

    fn tiny_vit_official(name: &str, image_size: i64, patch_embed_kernel: i64) -> Self {
        let t = TinyVitConfig::mobile_sam_like(patch_embed_kernel);
        let mut c = Self::official(name, *t.embed_dims.last().unwrap(), t.attention_blocks().len() as i64, *t.num_heads.last().unwrap(), [0; 4]);
        c.encoder_global_attn_indexes = vec![];
        c.window_size = *t.window_sizes.last().unwrap();
        c.image_size = image_size;
        c.patch_size = t.total_stride();
        c.tiny_vit = Some(t);
        c
    }

    /// LiteMedSAM (Ma et al., MedSAM, Nature Communications 2024): TinyViT with a 1×1 stride-1
    /// patch embedding, 256 input, 64×64 embedding, SAM's prompt encoder and mask decoder.
    pub fn lite_medsam() -> Self {
        let mut c = Self::tiny_vit_official("lite_medsam", 256, 1);
        c.pixel_input = PixelInput::Unit;
        c
    }

    /// MobileSAM: the same TinyViT with a 3×3 stride-2 patch embedding at 1024 input.
    pub fn mobile_sam() -> Self {
        Self::tiny_vit_official("mobile_sam", 1024, 3)
    }

    /// "vit_b" | "vit_l" | "vit_h" | "tiny" | "lite_medsam" | "mobile_sam".
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "vit_b" => Ok(Self::vit_b()),
            "vit_l" => Ok(Self::vit_l()),
            "vit_h" => Ok(Self::vit_h()),
            "tiny" => Ok(Self::tiny()),
            "lite_medsam" => Ok(Self::lite_medsam()),
            "mobile_sam" => Ok(Self::mobile_sam()),
            other => Err(Error::invalid(format!("unknown SAM variant '{other}' (expected vit_b, vit_l, vit_h, tiny, lite_medsam or mobile_sam)"))),
        }
    }

    /// (width, heads) of every encoder attention block, in LoRA order.
    pub fn attention_blocks(&self) -> Vec<(i64, i64)> {
        match &self.tiny_vit {
            Some(t) => t.attention_blocks(),
            None => vec![(self.encoder_embed_dim, self.encoder_num_heads); self.encoder_depth.max(0) as usize],
        }
    }

    /// Per-class decoder: `num_classes` foreground classes, `num_classes + 1` output masks.
    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn with_image_size(mut self, image_size: i64) -> Self {
        self.image_size = image_size;
        self
    }

    /// Tokens per side of the image embedding (image_size / patch_size).
    pub fn grid_size(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Side of the low-resolution logits (4 × grid: 256 for a 1024 input).
    pub fn low_res_size(&self) -> i64 {
        4 * self.grid_size()
    }

    pub fn num_mask_tokens(&self) -> i64 {
        self.num_classes + 1
    }

    /// Checks that the numbers describe a model that can be built.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let mut errs = Vec::new();
        let pos = [
            ("image_size", c.image_size),
            ("patch_size", c.patch_size),
            ("in_chans", c.in_chans),
            ("encoder_embed_dim", c.encoder_embed_dim),
            ("encoder_depth", c.encoder_depth),
            ("encoder_num_heads", c.encoder_num_heads),
            ("window_size", c.window_size),
            ("prompt_embed_dim", c.prompt_embed_dim),
            ("mask_in_chans", c.mask_in_chans),
            ("decoder_depth", c.decoder_depth),
            ("decoder_num_heads", c.decoder_num_heads),
            ("decoder_mlp_dim", c.decoder_mlp_dim),
            ("iou_head_depth", c.iou_head_depth),
            ("iou_head_hidden_dim", c.iou_head_hidden_dim),
            ("num_classes", c.num_classes),
        ];
        for (n, v) in pos {
            if v < 1 {
                errs.push(format!("{n} must be at least 1 (got {v})"));
            }
        }
        if !errs.is_empty() {
            return Err(Error::invalid(format!("SAM config '{}': {}", c.name, errs.join("; "))));
        }
        if let Some(t) = &c.tiny_vit {
            t.validate(&mut errs);
            if errs.is_empty() && t.total_stride() != c.patch_size {
                errs.push(format!("patch_size {} must equal the TinyViT's total stride {}", c.patch_size, t.total_stride()));
            }
        }
        if c.image_size % c.patch_size != 0 {
            errs.push(format!("image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size));
        }
        if c.encoder_embed_dim % c.encoder_num_heads != 0 {
            errs.push(format!("encoder_embed_dim {} is not divisible by encoder_num_heads {}", c.encoder_embed_dim, c.encoder_num_heads));
        }
        if c.prompt_embed_dim % 8 != 0 {
            errs.push(format!("prompt_embed_dim {} must be a multiple of 8 (upscaling to dim/8 channels)", c.prompt_embed_dim));
        }
        if c.prompt_embed_dim % c.decoder_num_heads != 0 || (c.prompt_embed_dim / 2) % c.decoder_num_heads != 0 {
            errs.push(format!("prompt_embed_dim {} and its half must be divisible by decoder_num_heads {}", c.prompt_embed_dim, c.decoder_num_heads));
        }
        if c.mask_in_chans % 4 != 0 {
            errs.push(format!("mask_in_chans {} must be a multiple of 4", c.mask_in_chans));
        }
        if !(c.mlp_ratio > 0.0 && c.mlp_ratio.is_finite()) {
            errs.push(format!("mlp_ratio must be positive (got {})", c.mlp_ratio));
        }
        for &i in c.encoder_global_attn_indexes.iter().filter(|_| c.tiny_vit.is_none()) {
            if i < 0 || i >= c.encoder_depth {
                errs.push(format!("global attention index {i} is outside 0..{}", c.encoder_depth));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(format!("SAM config '{}': {}", c.name, errs.join("; "))))
        }
    }
}

/// LoRA's blocks: every encoder attention block's fused qkv (a TinyViT's laid out per head).
impl QkvBlocks for SamConfig {
    fn qkv_blocks(&self) -> Vec<QkvBlock> {
        let per_head = self.tiny_vit.is_some();
        self.attention_blocks().into_iter().map(|(dim, heads)| QkvBlock { dim, heads, per_head }).collect()
    }
    fn describe(&self) -> String {
        format!("SAM '{}'", self.name)
    }
}

/// TinyViT hyperparameters (the `TinyViT(...)` constructor arguments that matter for weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyVitConfig {
    /// Channels of the 4 stages ([64, 128, 160, 320] for MobileSAM / LiteMedSAM).
    pub embed_dims: Vec<i64>,
    /// Blocks per stage ([2, 2, 6, 2]); stage 0 is MBConv, the others attention blocks.
    pub depths: Vec<i64>,
    /// Attention heads per stage (stage 0's entry is unused).
    pub num_heads: Vec<i64>,
    /// Attention window per stage (stage 0's entry is unused).
    pub window_sizes: Vec<i64>,
    pub mbconv_expand_ratio: f64,
    pub local_conv_size: i64,
    /// Kernel of both patch-embedding convolutions: 1 (stride 1, LiteMedSAM) or 3 (stride 2,
    /// padding 1, MobileSAM).
    pub patch_embed_kernel: i64,
    /// Stride of each PatchMerging's depthwise conv. The official rule: 1 when the output width
    /// is 320, 448 or 576, else 2 — [2, 2, 1] for these models.
    pub merge_strides: Vec<i64>,
}

impl TinyVitConfig {
    /// The MobileSAM / LiteMedSAM encoder; `patch_embed_kernel` 3 (MobileSAM) or 1 (LiteMedSAM).
    pub fn mobile_sam_like(patch_embed_kernel: i64) -> Self {
        TinyVitConfig {
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
            patch_embed_kernel,
            merge_strides: vec![2, 2, 1],
        }
    }

    /// Equal up to stage 0's heads and window, which no weight depends on (stage 0 has no
    /// attention), so a configuration read from a checkpoint cannot know them.
    pub fn same_weights(&self, other: &TinyVitConfig) -> bool {
        let tail = |v: &[i64]| v.get(1..).map(<[i64]>::to_vec);
        let mut a = self.clone();
        let mut b = other.clone();
        let (ha, hb, wa, wb) = (tail(&a.num_heads), tail(&b.num_heads), tail(&a.window_sizes), tail(&b.window_sizes));
        a.num_heads.clear();
        b.num_heads.clear();
        a.window_sizes.clear();
        b.window_sizes.clear();
        a == b && ha == hb && wa == wb
    }

    /// The official PatchMerging stride rule for an output width.
    pub fn official_merge_stride(out_dim: i64) -> i64 {
        if matches!(out_dim, 320 | 448 | 576) {
            1
        } else {
            2
        }
    }

    pub fn patch_embed_stride(&self) -> i64 {
        if self.patch_embed_kernel == 1 {
            1
        } else {
            2
        }
    }

    /// Input pixels per embedding cell along a side (4 for LiteMedSAM, 16 for MobileSAM).
    pub fn total_stride(&self) -> i64 {
        self.patch_embed_stride().pow(2) * self.merge_strides.iter().product::<i64>()
    }

    /// (width, heads) of every attention block in order (stages 1.. ; 10 blocks for the
    /// official models): the blocks LoRA attaches to.
    pub fn attention_blocks(&self) -> Vec<(i64, i64)> {
        (1..self.embed_dims.len()).flat_map(|s| std::iter::repeat_n((self.embed_dims[s], self.num_heads[s]), self.depths[s].max(0) as usize)).collect()
    }

    pub fn validate(&self, errs: &mut Vec<String>) {
        let n = self.embed_dims.len();
        if n < 2 {
            errs.push(format!("tiny_vit: at least 2 stages are needed (got {n})"));
            return;
        }
        for (name, len) in [("depths", self.depths.len()), ("num_heads", self.num_heads.len()), ("window_sizes", self.window_sizes.len())] {
            if len != n {
                errs.push(format!("tiny_vit: {name} has {len} entries for {n} stages"));
            }
        }
        if self.merge_strides.len() != n - 1 {
            errs.push(format!("tiny_vit: merge_strides has {} entries for {} stage transitions", self.merge_strides.len(), n - 1));
        }
        if !errs.is_empty() {
            return;
        }
        for s in 0..n {
            if self.embed_dims[s] < 2 || self.depths[s] < 0 {
                errs.push(format!("tiny_vit stage {s}: width {} and depth {} must be ≥ 2 and ≥ 0", self.embed_dims[s], self.depths[s]));
            }
            if s > 0 && (self.num_heads[s] < 1 || self.window_sizes[s] < 1 || self.embed_dims[s] % self.num_heads[s] != 0) {
                errs.push(format!("tiny_vit stage {s}: width {} must be divisible by {} heads, window {} ≥ 1", self.embed_dims[s], self.num_heads[s], self.window_sizes[s]));
            }
        }
        if !matches!(self.patch_embed_kernel, 1 | 3) {
            errs.push(format!("tiny_vit: patch_embed_kernel must be 1 or 3 (got {})", self.patch_embed_kernel));
        }
        if self.merge_strides.iter().any(|s| !matches!(s, 1 | 2)) {
            errs.push(format!("tiny_vit: merge_strides must be 1 or 2 (got {:?})", self.merge_strides));
        }
        if self.local_conv_size < 1 || self.local_conv_size % 2 == 0 {
            errs.push(format!("tiny_vit: local_conv_size must be odd (got {})", self.local_conv_size));
        }
        if !(self.mbconv_expand_ratio > 0.0 && self.mbconv_expand_ratio.is_finite()) {
            errs.push(format!("tiny_vit: mbconv_expand_ratio must be positive (got {})", self.mbconv_expand_ratio));
        }
    }
}
