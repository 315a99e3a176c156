//! Segment Anything (SAM) in tch, mirroring the official `segment-anything` modules
//! (`modeling/*.py`, `build_sam.py`) so that tensor names equal the official state-dict keys
//! (`image_encoder.blocks.0.attn.qkv.weight`, `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`,
//! `mask_decoder.output_hypernetworks_mlps.0.layers.0.weight`, ...) and official checkpoints
//! load one to one.
//!
//! Differences from the official `Sam` module, all following SAMed / SFR:
//! - the mask decoder is per class: `num_classes + 1` mask tokens and every token's mask is
//!   returned (token 0 = background);
//! - no prompts are used: empty sparse embedding, `no_mask_embed` as dense embedding;
//! - no pixel mean/std normalisation and no padding: the input is already a z-scored square
//!   image of `image_size` pixels. (`pixel_mean`/`pixel_std` are non-persistent buffers in the
//!   official module, so they are not part of its state dict either.)
//! - `image_size` may differ from the checkpoint's 1024: see [`Sam::load_tensors`].
pub mod checkpoint;
pub mod common;
pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod transformer;

use crate::error::{Error, Result};
use crate::nn::lora::Lora;
use common::{ParamEntry, Params};
use image_encoder::ImageEncoderViT;
use mask_decoder::MaskDecoder;
use prompt_encoder::PromptEncoder;
use serde::{Deserialize, Serialize};
use tiny_vit::{TinyVit, TinyVitConfig};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

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
        Self::tiny_vit_official("lite_medsam", 256, 1)
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

/// What to do with the mask-decoder heads (`mask_tokens`, `output_hypernetworks_mlps.*`,
/// `iou_prediction_head.*`) when the checkpoint was made for another number of mask tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadPolicy {
    /// Re-initialise only the head tensors whose shape does not fit or that the checkpoint lacks
    /// (with the official 4 tokens and 9 wanted: `mask_tokens.weight`, hypernetwork MLPs 4..8,
    /// `iou_prediction_head.layers.2.*`); the fitting ones (MLPs 0..3, IoU layers 0–1) are loaded.
    #[default]
    ReinitMismatched,
    /// SAMed's `load_from`: as soon as any head tensor does not fit, all head tensors are
    /// re-initialised (including MLPs 0..3 and the whole IoU head).
    ReinitAllHeads,
}

/// What a checkpoint load did besides copying tensors one to one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Keys copied from the file (resized ones included).
    pub loaded: usize,
    /// Keys resized for a different image size: (key, shape in the file, shape in the model).
    pub resized: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// Decoder-head keys left with a fresh PyTorch-default initialisation, with the reason.
    pub reinitialised: Vec<(String, String)>,
    /// Decoder-head keys of the file that this model has no place for (fewer mask tokens).
    pub unused: Vec<String>,
}

/// Output of the mask decoder for a batch of images.
#[derive(Debug)]
pub struct SamOutput {
    /// [B, num_classes + 1, 4g, 4g] logits (256×256 for a 1024 input); channel 0 = background.
    pub low_res_logits: Tensor,
    /// [B, num_classes + 1] predicted IoU of each mask.
    pub iou_predictions: Tensor,
}

/// The image encoder of a SAM model: SAM's ViT or a TinyViT (MobileSAM, LiteMedSAM).
#[derive(Debug)]
pub enum ImageEncoder {
    Vit(ImageEncoderViT),
    TinyVit(TinyVit),
}

impl ImageEncoder {
    /// Images [B, 3, S, S] -> embedding [B, C, S/p, S/p]; `lora` adds its update to every
    /// attention block's fused qkv.
    pub fn forward(&self, x: &Tensor, lora: Option<&Lora>) -> Tensor {
        match self {
            ImageEncoder::Vit(e) => e.forward(x, lora),
            ImageEncoder::TinyVit(e) => e.forward(x, lora),
        }
    }

    /// The ViT position embedding (none for TinyViT, which has no absolute positions).
    pub fn pos_embed(&self) -> Option<&Tensor> {
        match self {
            ImageEncoder::Vit(e) => Some(&e.pos_embed),
            ImageEncoder::TinyVit(_) => None,
        }
    }
}

/// SAM: image encoder, prompt encoder and per-class mask decoder.
#[derive(Debug)]
pub struct Sam {
    pub cfg: SamConfig,
    pub image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    entries: Vec<ParamEntry>,
    device: Device,
}

/// True for the mask-decoder tensors whose shapes depend on the number of mask tokens.
pub fn is_decoder_head(key: &str) -> bool {
    key.starts_with("mask_decoder.mask_tokens.") || key.starts_with("mask_decoder.output_hypernetworks_mlps.") || key.starts_with("mask_decoder.iou_prediction_head.")
}

impl Sam {
    /// Builds the model with PyTorch's default initialisation in `path` of a VarStore. The
    /// VarStore names are `<path>.<official key>`; built at the root they equal the official
    /// keys. `positional_encoding_gaussian_matrix` is a non-trainable variable, as it is a
    /// buffer in PyTorch.
    pub fn new(path: &nn::Path, cfg: &SamConfig) -> Result<Sam> {
        cfg.validate()?;
        let p = Params::root(path);
        let image_encoder = match &cfg.tiny_vit {
            Some(t) => ImageEncoder::TinyVit(TinyVit::new(&p.sub("image_encoder"), cfg, t)),
            None => ImageEncoder::Vit(ImageEncoderViT::new(&p.sub("image_encoder"), cfg)),
        };
        let prompt_encoder = PromptEncoder::new(&p.sub("prompt_encoder"), cfg);
        let mask_decoder = MaskDecoder::new(&p.sub("mask_decoder"), cfg);
        Ok(Sam { cfg: cfg.clone(), image_encoder, prompt_encoder, mask_decoder, entries: p.take_entries(), device: path.device() })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Every tensor with its official state-dict key, in construction order (buffers included).
    pub fn named_tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|e| (e.key.as_str(), &e.tensor))
    }

    /// The tensor of an official key.
    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        self.entries.iter().find(|e| e.key == key).map(|e| &e.tensor)
    }

    /// Parameter count as PyTorch's `sum(p.numel() for p in model.parameters())` (buffers not
    /// counted): 93,735,472 for the official vit_b.
    pub fn num_parameters(&self) -> i64 {
        self.entries.iter().filter(|e| !e.buffer).map(|e| e.tensor.numel() as i64).sum()
    }

    /// Freezes (false) or unfreezes (true) every image-encoder tensor.
    pub fn set_image_encoder_trainable(&self, trainable: bool) {
        for e in self.entries.iter().filter(|e| e.key.starts_with("image_encoder.")) {
            let _ = e.tensor.set_requires_grad(trainable);
        }
    }

    /// The parameters that currently require a gradient (prompt encoder and mask decoder, plus
    /// the image encoder unless frozen).
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        self.entries.iter().filter(|e| !e.buffer && e.tensor.requires_grad()).map(|e| e.tensor.shallow_clone()).collect()
    }

    fn check_images(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.size();
        let n = self.cfg.image_size;
        if s.len() != 4 || s[1] != self.cfg.in_chans || s[2] != n || s[3] != n {
            return Err(Error::invalid(format!("SAM '{}' expects images [B, {}, {n}, {n}], got {s:?}", self.cfg.name, self.cfg.in_chans)));
        }
        if s[0] == 0 {
            return Err(Error::invalid("SAM: empty batch"));
        }
        if !images.is_floating_point() {
            return Err(Error::invalid(format!("SAM expects floating-point images, got {:?}", images.kind())));
        }
        let kind = self.prompt_encoder.no_mask_embed.kind();
        Ok(images.to_device(self.device).to_kind(kind))
    }

    /// Image embedding [B, prompt_embed_dim, g, g] of z-scored images [B, 3, S, S].
    pub fn encode_image(&self, images: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let x = self.check_images(images)?;
        if let Some(l) = lora {
            l.check_fits(&self.cfg)?;
        }
        Ok(self.image_encoder.forward(&x, lora))
    }

    /// The mask decoder on image embeddings [B, C, g, g] without prompts.
    pub fn decode(&self, image_embeddings: &Tensor) -> Result<SamOutput> {
        let s = image_embeddings.size();
        let (c, g) = (self.cfg.prompt_embed_dim, self.cfg.grid_size());
        if s.len() != 4 || s[1] != c || s[2] != g || s[3] != g {
            return Err(Error::invalid(format!("SAM '{}' mask decoder expects embeddings [B, {c}, {g}, {g}], got {s:?}", self.cfg.name)));
        }
        let b = s[0];
        let (sparse, dense) = self.prompt_encoder.no_prompt(b);
        let image_pe = self.prompt_encoder.get_dense_pe();
        let (low_res_logits, iou_predictions) = self.mask_decoder.predict_masks(image_embeddings, &image_pe, &sparse, &dense)?;
        Ok(SamOutput { low_res_logits, iou_predictions })
    }

    /// The mask decoder prompted by one box per image (boxes [B, 4], x0 y0 x1 y1 in input
    /// pixels). Every mask token's logits are returned; for an official checkpoint, token 0 is
    /// the single-mask output (`multimask_output=False`), which is what LiteMedSAM was trained
    /// to produce for a box.
    pub fn decode_with_boxes(&self, image_embeddings: &Tensor, boxes: &Tensor) -> Result<SamOutput> {
        let s = image_embeddings.size();
        let (c, g) = (self.cfg.prompt_embed_dim, self.cfg.grid_size());
        if s.len() != 4 || s[1] != c || s[2] != g || s[3] != g {
            return Err(Error::invalid(format!("SAM '{}' mask decoder expects embeddings [B, {c}, {g}, {g}], got {s:?}", self.cfg.name)));
        }
        if boxes.size() != [s[0], 4] || !boxes.is_floating_point() {
            return Err(Error::invalid(format!("SAM box prompts must be floating-point [{}, 4], got {:?} {:?}", s[0], boxes.kind(), boxes.size())));
        }
        let (sparse, dense) = self.prompt_encoder.embed_boxes(boxes);
        let image_pe = self.prompt_encoder.get_dense_pe();
        let (low_res_logits, iou_predictions) = self.mask_decoder.predict_masks(image_embeddings, &image_pe, &sparse, &dense)?;
        Ok(SamOutput { low_res_logits, iou_predictions })
    }

    /// Images [B, 3, S, S] (already z-scored; no SAM pixel normalisation) -> per-class
    /// low-resolution logits and IoU predictions. `lora` adds its update to every encoder qkv.
    pub fn forward(&self, images: &Tensor, lora: Option<&Lora>) -> Result<SamOutput> {
        let emb = self.encode_image(images, lora)?;
        self.decode(&emb)
    }

    /// Reads a checkpoint (`.pth` state dict as written by `torch.save`, or `.safetensors`) and
    /// loads it with [`Sam::load_tensors`].
    pub fn load_checkpoint(&self, file: &Path, policy: HeadPolicy) -> Result<LoadReport> {
        let tensors = crate::nn::weights::load_tensors(file)?;
        self.load_tensors(tensors, file, policy)
    }

    /// Copies a state dict into the model.
    ///
    /// - Every key must match: a missing, extra or wrongly shaped tensor is an error naming the
    ///   keys (and saying which SAM variant the file looks like), except for the cases below.
    /// - Image size: when the file's `image_encoder.pos_embed` has another grid than this model,
    ///   it is resized bilinearly (align_corners = false), and the relative position tables of
    ///   the global-attention blocks (`blocks.{i}.attn.rel_pos_{h,w}`, i in the config's global
    ///   indexes, length 2g-1) are resized bilinearly along their length to 2g'-1 — SAMed's
    ///   `load_from`, which is also what the official `get_rel_pos` would compute on the fly.
    ///   Windowed blocks keep their tables (the window does not change).
    /// - Per-class decoder: head tensors (see [`is_decoder_head`]) that do not fit are
    ///   re-initialised with PyTorch's default initialisation and reported, per `policy`.
    ///
    /// Nothing is modified when an error is returned.
    pub fn load_tensors(&self, tensors: Vec<(String, Tensor)>, source: &Path, policy: HeadPolicy) -> Result<LoadReport> {
        let file: HashMap<String, Tensor> = tensors.into_iter().collect();
        let own: HashMap<&str, &ParamEntry> = self.entries.iter().map(|e| (e.key.as_str(), e)).collect();
        let g = self.cfg.grid_size();
        let file_grid = file.get("image_encoder.pos_embed").map(|t| t.size()).filter(|s| s.len() == 4 && s[1] == s[2]).map(|s| s[1]);
        let global: BTreeSet<String> = self
            .cfg
            .encoder_global_attn_indexes
            .iter()
            .flat_map(|i| [format!("image_encoder.blocks.{i}.attn.rel_pos_h"), format!("image_encoder.blocks.{i}.attn.rel_pos_w")])
            .collect();

        enum Plan<'a> {
            Copy(&'a Tensor),
            Resize(&'a Tensor),
            Reinit(String),
        }
        let mut plan: Vec<(&ParamEntry, Plan)> = Vec::new();
        let (mut missing, mut mismatched, mut extra, mut unused) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut head_misfit = false;
        for e in &self.entries {
            let want = e.tensor.size();
            match file.get(&e.key) {
                // Integer buffers (BatchNorm's num_batches_tracked) stay integer, floats float.
                Some(t) if t.is_floating_point() != e.tensor.is_floating_point() => mismatched.push(format!("{} (dtype {:?} in the file, {:?} in the model)", e.key, t.kind(), e.tensor.kind())),
                Some(t) if t.size() == want => plan.push((e, Plan::Copy(t))),
                Some(t) => {
                    let have = t.size();
                    let resizable_grid = file_grid.is_some_and(|fg| fg != g);
                    let pos_resizable = e.key == "image_encoder.pos_embed" && have.len() == 4 && have[0] == 1 && have[1] == have[2] && have[3] == want[3];
                    let rel_resizable = global.contains(&e.key) && have.len() == 2 && have[1] == want[1] && Some(have[0]) == file_grid.map(|fg| 2 * fg - 1);
                    if resizable_grid && (pos_resizable || rel_resizable) {
                        plan.push((e, Plan::Resize(t)));
                    } else if is_decoder_head(&e.key) {
                        head_misfit = true;
                        plan.push((e, Plan::Reinit(format!("shape {have:?} in the file, {want:?} here"))));
                    } else {
                        mismatched.push(format!("{}: {have:?} in the file, {want:?} in the model", e.key));
                    }
                }
                None if is_decoder_head(&e.key) => {
                    head_misfit = true;
                    plan.push((e, Plan::Reinit("not in the file (more mask tokens here)".into())));
                }
                None => missing.push(e.key.clone()),
            }
        }
        for k in file.keys() {
            if !own.contains_key(k.as_str()) {
                if is_decoder_head(k) {
                    head_misfit = true;
                    unused.push(k.clone());
                } else {
                    extra.push(k.clone());
                }
            }
        }
        if !(missing.is_empty() && mismatched.is_empty() && extra.is_empty()) {
            missing.sort();
            extra.sort();
            mismatched.sort();
            let mut msg = format!("checkpoint does not fit SAM '{}' (embed dim {}, {} blocks)", self.cfg.name, self.cfg.encoder_embed_dim, self.cfg.encoder_depth);
            if let Some(guess) = guess_variant(&file) {
                msg.push_str(&format!("; the file looks like {guess}"));
            }
            for (what, list) in [("shape mismatch", &mismatched), ("missing from the file", &missing), ("not in the model", &extra)] {
                if !list.is_empty() {
                    msg.push_str(&format!("; {} {what}: {}", list.len(), list_head(list, 8)));
                }
            }
            return Err(Error::format(source, msg));
        }

        let mut report = LoadReport { unused, ..Default::default() };
        tch::no_grad(|| -> Result<()> {
            for (e, p) in plan {
                let p = match p {
                    Plan::Copy(_) if policy == HeadPolicy::ReinitAllHeads && head_misfit && is_decoder_head(&e.key) => Plan::Reinit("SAMed rule: another head tensor does not fit".into()),
                    p => p,
                };
                let mut dst = e.tensor.shallow_clone();
                match p {
                    Plan::Copy(t) => {
                        dst.f_copy_(&t.to_kind(dst.kind()).to_device(dst.device()))?;
                        report.loaded += 1;
                    }
                    Plan::Resize(t) => {
                        let want = dst.size();
                        let r = if e.key == "image_encoder.pos_embed" {
                            resize_pos_embed(t, want[1], want[2])
                        } else {
                            resize_rel_pos(t, want[0])
                        };
                        dst.f_copy_(&r.to_kind(dst.kind()).to_device(dst.device()))?;
                        report.resized.push((e.key.clone(), t.size(), want));
                        report.loaded += 1;
                    }
                    Plan::Reinit(why) => {
                        let fresh = e.init.sample(&dst.size(), dst.kind(), dst.device());
                        dst.f_copy_(&fresh)?;
                        report.reinitialised.push((e.key.clone(), why));
                    }
                }
            }
            Ok(())
        })?;
        Ok(report)
    }

    /// Starts every mask token of the per-class decoder, with its hypernetwork MLP and IoU-head
    /// row, as a copy of the checkpoint's mask token `token` (0 = the single-mask output, the
    /// one LiteMedSAM was trained to produce). All classes then begin from the pretrained mask
    /// head instead of random heads (which a pretrained decoder answers with near-constant
    /// logits); the per-class loss separates them from the first step, as each token's
    /// gradient follows its own class. Nothing is changed on error.
    pub fn init_heads_from_token(&self, file: &HashMap<String, Tensor>, source: &Path, token: i64) -> Result<()> {
        let get = |k: &str| file.get(k).ok_or_else(|| Error::format(source, format!("{k} is missing: cannot initialise the class heads from it")));
        let tokens = get("mask_decoder.mask_tokens.weight")?;
        if tokens.size().len() != 2 || token >= tokens.size()[0] || tokens.size()[1] != self.cfg.prompt_embed_dim {
            return Err(Error::format(source, format!("mask_tokens {:?} has no token {token} of width {}", tokens.size(), self.cfg.prompt_embed_dim)));
        }
        let mut plan: Vec<(&Tensor, Tensor)> = Vec::new();
        let n = self.cfg.num_mask_tokens();
        let own = |k: &str| self.tensor(k).ok_or_else(|| Error::invalid(format!("SAM has no tensor {k}")));
        plan.push((own("mask_decoder.mask_tokens.weight")?, tokens.get(token).unsqueeze(0).expand([n, -1], false)));
        for i in 0..n {
            for l in 0..3 {
                for wb in ["weight", "bias"] {
                    let from = get(&format!("mask_decoder.output_hypernetworks_mlps.{token}.layers.{l}.{wb}"))?;
                    plan.push((own(&format!("mask_decoder.output_hypernetworks_mlps.{i}.layers.{l}.{wb}"))?, from.shallow_clone()));
                }
            }
        }
        let last = self.cfg.iou_head_depth - 1;
        for wb in ["weight", "bias"] {
            let k = format!("mask_decoder.iou_prediction_head.layers.{last}.{wb}");
            let from = get(&k)?.get(token).unsqueeze(0);
            let want = own(&k)?;
            let shape: Vec<i64> = want.size();
            plan.push((want, from.expand(shape.as_slice(), false)));
        }
        for (dst, src) in &plan {
            if dst.size() != src.size() {
                return Err(Error::format(source, format!("class-head init: shape {:?} in the file, {:?} in the model", src.size(), dst.size())));
            }
        }
        tch::no_grad(|| -> Result<()> {
            for (dst, src) in plan {
                dst.shallow_clone().f_copy_(&src.to_kind(dst.kind()).to_device(dst.device()))?;
            }
            Ok(())
        })
    }

    /// Writes every tensor under its official key (a state dict the official code can load
    /// after `safetensors.torch.load_file`), with the config as JSON in the metadata
    /// (`sam_config`). The file appears only when complete.
    pub fn save_safetensors(&self, file: &Path) -> Result<()> {
        let named: Vec<(&str, Tensor)> = self.entries.iter().map(|e| (e.key.as_str(), e.tensor.detach())).collect();
        crate::nn::weights::save_safetensors(file, &named, &self.metadata())
    }

    /// `{"sam_config": <SamConfig JSON>}` for file metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        let json = serde_json::to_string(&self.cfg).expect("SamConfig serialises");
        HashMap::from([("sam_config".to_string(), json)])
    }
}

/// Bilinear (align_corners = false) resize of a [1, g, g, C] position embedding.
pub fn resize_pos_embed(pos: &Tensor, h: i64, w: i64) -> Tensor {
    pos.to_kind(Kind::Float).permute([0, 3, 1, 2]).upsample_bilinear2d([h, w], false, None, None).permute([0, 2, 3, 1])
}

/// Bilinear (align_corners = false) resize of a [L, C] relative position table to [len, C]
/// (linear along L; C is unchanged), as SAMed does.
pub fn resize_rel_pos(rel: &Tensor, len: i64) -> Tensor {
    let c = rel.size()[1];
    rel.to_kind(Kind::Float).unsqueeze(0).unsqueeze(0).upsample_bilinear2d([len, c], false, None, None).get(0).get(0)
}

/// Low-resolution logits [B, K, h, w] upsampled bilinearly (align_corners = false) to
/// [B, K, size.0, size.1].
pub fn upscale_logits(low_res_logits: &Tensor, size: (i64, i64)) -> Tensor {
    low_res_logits.upsample_bilinear2d([size.0, size.1], false, None, None)
}

/// Per-pixel class probabilities [B, K, size.0, size.1]: the logits upsampled as in
/// [`upscale_logits`], then softmax over the mask tokens (dim 1).
pub fn class_probabilities(low_res_logits: &Tensor, size: (i64, i64)) -> Tensor {
    upscale_logits(low_res_logits, size).softmax(1, None::<Kind>)
}

fn list_head(list: &[String], n: usize) -> String {
    let mut s = list.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if list.len() > n {
        s.push_str(&format!(", ... ({} more)", list.len() - n));
    }
    s
}

/// Names the SAM variant a state dict looks like: a TinyViT (LiteMedSAM, MobileSAM) from its
/// patch embedding and stages, a ViT from its patch-embedding width and depth.
fn guess_variant(file: &HashMap<String, Tensor>) -> Option<String> {
    if let Some(t) = detect_tiny_vit(file) {
        let name = match t.patch_embed_kernel {
            _ if t.same_weights(SamConfig::lite_medsam().tiny_vit.as_ref().unwrap()) => "LiteMedSAM (lite_medsam)",
            _ if t.same_weights(SamConfig::mobile_sam().tiny_vit.as_ref().unwrap()) => "MobileSAM (mobile_sam)",
            _ => "a TinyViT SAM",
        };
        return Some(format!("{name} (TinyViT, widths {:?}, depths {:?}, patch embedding {k}×{k})", t.embed_dims, t.depths, k = t.patch_embed_kernel));
    }
    let dim = file.get("image_encoder.patch_embed.proj.weight").map(|t| t.size()).filter(|s| !s.is_empty())?[0];
    let depth = file
        .keys()
        .filter_map(|k| k.strip_prefix("image_encoder.blocks.")?.split('.').next()?.parse::<i64>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let name = [SamConfig::vit_b(), SamConfig::vit_l(), SamConfig::vit_h()]
        .into_iter()
        .find(|c| c.encoder_embed_dim == dim && c.encoder_depth == depth)
        .map(|c| format!("SAM {}", c.name))
        .unwrap_or_else(|| "a SAM model".to_string());
    Some(format!("{name} (embed dim {dim}, {depth} blocks)"))
}

fn dims(file: &HashMap<String, Tensor>, key: &str) -> Option<Vec<i64>> {
    file.get(key).map(|t| t.size())
}

/// Distinct integer indices `i` of keys `<prefix>{i}.…`, counted as max + 1.
fn count_indexed(file: &HashMap<String, Tensor>, prefix: &str) -> i64 {
    file.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<i64>().ok()).max().map_or(0, |m| m + 1)
}

/// The TinyViT configuration of a state dict with `image_encoder.patch_embed.seq.*` keys, read
/// from its shapes (widths, depths, heads from `attention_biases` [heads, window²], window,
/// local conv, MLP ratio, MBConv expansion); the PatchMerging strides follow the official rule.
fn detect_tiny_vit(file: &HashMap<String, Tensor>) -> Option<TinyVitConfig> {
    let pe = dims(file, "image_encoder.patch_embed.seq.0.c.weight").filter(|d| d.len() == 4)?;
    let stages = count_indexed(file, "image_encoder.layers.");
    if stages < 2 {
        return None;
    }
    let mut t = TinyVitConfig { embed_dims: vec![], depths: vec![], num_heads: vec![], window_sizes: vec![], mbconv_expand_ratio: 4.0, local_conv_size: 3, patch_embed_kernel: pe[2], merge_strides: vec![] };
    for s in 0..stages {
        let pre = format!("image_encoder.layers.{s}.");
        t.depths.push(count_indexed(file, &format!("{pre}blocks.")));
        let width = if s == 0 {
            dims(file, "image_encoder.patch_embed.seq.2.c.weight")?[0]
        } else {
            dims(file, &format!("image_encoder.layers.{}.downsample.conv1.c.weight", s - 1))?[0]
        };
        t.embed_dims.push(width);
        if s == 0 {
            if let Some(d) = dims(file, &format!("{pre}blocks.0.conv1.c.weight")) {
                t.mbconv_expand_ratio = d[0] as f64 / width as f64;
            }
            t.num_heads.push(1);
            t.window_sizes.push(1);
        } else {
            let ab = dims(file, &format!("{pre}blocks.0.attn.attention_biases")).filter(|d| d.len() == 2).unwrap_or(vec![1, 1]);
            t.num_heads.push(ab[0]);
            t.window_sizes.push((ab[1] as f64).sqrt().round() as i64);
            if s == 1 {
                if let Some(d) = dims(file, &format!("{pre}blocks.0.local_conv.c.weight")) {
                    t.local_conv_size = d[2];
                }
            }
        }
        if s > 0 {
            t.merge_strides.push(TinyVitConfig::official_merge_stride(width));
        }
    }
    Some(t)
}

/// The configuration a SAM state dict was made for, from its keys and shapes: LiteMedSAM and
/// MobileSAM (TinyViT encoders), or SAM's ViT (width, depth, heads from the relative tables,
/// global-attention blocks, window, image size from `pos_embed`). The class count is that of
/// the file's mask tokens (3 for official checkpoints); the name is the official one when the
/// encoder equals an official configuration. `None` when the keys are not a SAM state dict.
pub fn detect_config(file: &HashMap<String, Tensor>) -> Option<SamConfig> {
    let tokens = dims(file, "mask_decoder.mask_tokens.weight").filter(|d| d.len() == 2)?;
    let mut c = if let Some(t) = detect_tiny_vit(file) {
        let mut c = if t.patch_embed_kernel == 1 { SamConfig::lite_medsam() } else { SamConfig::mobile_sam() };
        if !c.tiny_vit.as_ref().is_some_and(|o| o.same_weights(&t)) {
            c.name = "tiny_vit".into();
            c.patch_size = t.total_stride();
            c.encoder_embed_dim = *t.embed_dims.last().unwrap();
            c.encoder_depth = t.attention_blocks().len() as i64;
            if let Some(fc1) = dims(file, "image_encoder.layers.1.blocks.0.mlp.fc1.weight") {
                c.mlp_ratio = fc1[0] as f64 / t.embed_dims[1] as f64;
            }
            c.tiny_vit = Some(t);
        }
        c
    } else {
        let pw = dims(file, "image_encoder.patch_embed.proj.weight").filter(|d| d.len() == 4)?;
        let (dim, patch) = (pw[0], pw[2]);
        let depth = count_indexed(file, "image_encoder.blocks.");
        let grid = dims(file, "image_encoder.pos_embed").filter(|d| d.len() == 4)?[1];
        let rel = |i: i64| dims(file, &format!("image_encoder.blocks.{i}.attn.rel_pos_h")).filter(|d| d.len() == 2);
        let head_dim = rel(0)?[1];
        let global: Vec<i64> = (0..depth).filter(|&i| rel(i).is_some_and(|d| d[0] == 2 * grid - 1)).collect();
        let window = (0..depth).filter(|i| !global.contains(i)).find_map(rel).map_or(14, |d| (d[0] + 1) / 2);
        let mut c = [SamConfig::vit_b(), SamConfig::vit_l(), SamConfig::vit_h()].into_iter().find(|c| c.encoder_embed_dim == dim && c.encoder_depth == depth).unwrap_or_else(SamConfig::vit_b);
        if (c.encoder_embed_dim, c.encoder_depth) != (dim, depth) {
            c.name = "vit".into();
        }
        c.encoder_embed_dim = dim;
        c.encoder_depth = depth;
        c.encoder_num_heads = dim / head_dim.max(1);
        c.encoder_global_attn_indexes = global;
        c.window_size = window;
        c.patch_size = patch;
        c.image_size = grid * patch;
        if let Some(l1) = dims(file, "image_encoder.blocks.0.mlp.lin1.weight") {
            c.mlp_ratio = l1[0] as f64 / dim as f64;
        }
        c
    };
    c.prompt_embed_dim = tokens[1];
    c.num_classes = tokens[0] - 1;
    if let Some(d) = dims(file, "mask_decoder.transformer.layers.0.mlp.lin1.weight") {
        c.decoder_mlp_dim = d[0];
    }
    c.decoder_depth = count_indexed(file, "mask_decoder.transformer.layers.");
    if let Some(d) = dims(file, "prompt_encoder.mask_downscaling.3.weight") {
        c.mask_in_chans = d[0];
    }
    if let Some(d) = dims(file, "mask_decoder.iou_prediction_head.layers.0.weight") {
        c.iou_head_hidden_dim = d[0];
    }
    c.iou_head_depth = count_indexed(file, "mask_decoder.iou_prediction_head.layers.");
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_can_move_to_worker_threads() {
        fn send<T: Send>() {}
        send::<Sam>();
        send::<crate::nn::lora::Lora>();
    }

    /// One vit_b build serves every check that needs it (a build initialises 94M values).
    #[test]
    fn vit_b_parameter_count_and_vit_l_checkpoint_error() {
        let vs = nn::VarStore::new(Device::Cpu);
        let sam = Sam::new(&vs.root(), &SamConfig::vit_b()).unwrap();
        assert_eq!(sam.num_parameters(), 93_735_472);
        assert_eq!(sam.named_tensors().count(), 314, "keys of the official state dict");
        assert_eq!(sam.tensor("image_encoder.blocks.2.attn.rel_pos_h").unwrap().size(), vec![127, 64]);
        assert_eq!(sam.tensor("image_encoder.blocks.0.attn.rel_pos_h").unwrap().size(), vec![27, 64]);

        // A vit_l state dict (shapes only: stride-0 views cost no memory) given to vit_b.
        let zero = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let map = |d: i64| match d {
            768 => 1024,
            2304 => 3072,
            3072 => 4096,
            d => d,
        };
        let mut file = Vec::new();
        for (k, t) in sam.named_tensors() {
            let shape: Vec<i64> = if k.starts_with("image_encoder.") { t.size().into_iter().map(map).collect() } else { t.size() };
            file.push((k.to_string(), zero.expand(shape.as_slice(), false)));
            if let Some(rest) = k.strip_prefix("image_encoder.blocks.0.") {
                for b in 12..24 {
                    let shape: Vec<i64> = t.size().into_iter().map(map).collect();
                    file.push((format!("image_encoder.blocks.{b}.{rest}"), zero.expand(shape.as_slice(), false)));
                }
            }
        }
        let before = sam.tensor("mask_decoder.iou_token.weight").unwrap().copy();
        let err = sam.load_tensors(file, Path::new("sam_vit_l_0b3195.pth"), HeadPolicy::ReinitMismatched).unwrap_err().to_string();
        assert!(err.starts_with("sam_vit_l_0b3195.pth: checkpoint does not fit SAM 'vit_b'"), "{err}");
        assert!(err.contains("looks like SAM vit_l (embed dim 1024, 24 blocks)"), "{err}");
        assert!(err.contains("image_encoder.blocks.0.attn.proj.weight: [1024, 1024] in the file, [768, 768] in the model"), "{err}");
        assert!(err.contains("not in the model: image_encoder.blocks.12."), "{err}");
        assert!(sam.tensor("mask_decoder.iou_token.weight").unwrap().equal(&before), "nothing loaded on error");
    }

    #[test]
    fn official_configs() {
        let b = SamConfig::vit_b();
        assert_eq!((b.encoder_embed_dim, b.encoder_depth, b.encoder_num_heads, b.window_size), (768, 12, 12, 14));
        assert_eq!(b.encoder_global_attn_indexes, vec![2, 5, 8, 11]);
        assert_eq!((b.grid_size(), b.low_res_size(), b.num_mask_tokens()), (64, 256, 4));
        let l = SamConfig::vit_l();
        assert_eq!((l.encoder_embed_dim, l.encoder_depth, l.encoder_num_heads), (1024, 24, 16));
        assert_eq!(l.encoder_global_attn_indexes, vec![5, 11, 17, 23]);
        let h = SamConfig::vit_h();
        assert_eq!((h.encoder_embed_dim, h.encoder_depth, h.encoder_num_heads), (1280, 32, 16));
        assert_eq!(h.encoder_global_attn_indexes, vec![7, 15, 23, 31]);
        for c in [b, l, h, SamConfig::tiny()] {
            c.validate().unwrap();
            assert_eq!(SamConfig::from_name(&c.name).unwrap(), c);
        }
        assert!(SamConfig::from_name("vit_x").is_err());
        let e = SamConfig::vit_b().with_image_size(500).validate().unwrap_err().to_string();
        assert!(e.contains("image_size 500 is not a multiple of patch_size 16"), "{e}");
        assert!(SamConfig::vit_b().with_num_classes(0).validate().is_err());
        let mut c = SamConfig::tiny();
        c.encoder_global_attn_indexes = vec![4];
        assert!(c.validate().unwrap_err().to_string().contains("global attention index 4"));
        // JSON round trip; unknown keys are refused.
        let j = serde_json::to_string(&SamConfig::vit_b().with_num_classes(8)).unwrap();
        assert_eq!(serde_json::from_str::<SamConfig>(&j).unwrap().num_classes, 8);
        assert!(serde_json::from_str::<SamConfig>(&j.replace("\"name\"", "\"nmae\"")).is_err());
    }

    #[test]
    fn forward_shapes_probabilities_and_bad_input() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        // Placed below a prefix: names get the prefix, the model's own keys do not.
        let sam = Sam::new(&vs.root().sub("sam"), &SamConfig::tiny().with_num_classes(2)).unwrap();
        assert!(vs.variables().contains_key("sam.image_encoder.pos_embed"));
        assert!(sam.tensor("image_encoder.pos_embed").is_some());
        let x = Tensor::randn([3, 3, 128, 128], (Kind::Float, Device::Cpu));
        let o = tch::no_grad(|| sam.forward(&x, None)).unwrap();
        assert_eq!(o.low_res_logits.size(), vec![3, 3, 32, 32]);
        assert_eq!(o.iou_predictions.size(), vec![3, 3]);
        let p = class_probabilities(&o.low_res_logits, (128, 128));
        assert_eq!(p.size(), vec![3, 3, 128, 128]);
        let s = p.sum_dim_intlist(1, false, Kind::Float);
        assert!(f64::try_from((s - 1.0).abs().max()).unwrap() < 1e-5);
        // Images are independent in a batch: image 1 alone gives the same logits.
        let one = tch::no_grad(|| sam.forward(&x.narrow(0, 1, 1), None)).unwrap();
        let d = f64::try_from((one.low_res_logits - o.low_res_logits.narrow(0, 1, 1)).abs().max()).unwrap();
        assert!(d < 1e-5, "batch mixing: {d}");
        // Upsampling is bilinear with align_corners = false: a constant stays constant and a
        // 2× upsample of [0, 1] along a row gives [0, .25, .75, 1].
        let row = Tensor::from_slice(&[0f32, 1.0]).view([1, 1, 1, 2]);
        let up = upscale_logits(&row, (1, 4));
        assert_eq!(Vec::<f32>::try_from(up.flatten(0, -1)).unwrap(), vec![0.0, 0.25, 0.75, 1.0]);

        for bad in [Tensor::zeros([2, 3, 64, 64], (Kind::Float, Device::Cpu)), Tensor::zeros([2, 1, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([3, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([0, 3, 128, 128], (Kind::Float, Device::Cpu)), Tensor::zeros([1, 3, 128, 128], (Kind::Int64, Device::Cpu))] {
            assert!(sam.forward(&bad, None).is_err(), "{:?} {:?}", bad.size(), bad.kind());
        }
        assert!(sam.decode(&Tensor::zeros([1, 16, 8, 8], (Kind::Float, Device::Cpu))).is_err());

        // Our own save loads back one to one, with the config in the metadata.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sam.safetensors");
        sam.save_safetensors(&f).unwrap();
        let back = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &sam.cfg).unwrap();
        let rep = back.load_checkpoint(&f, HeadPolicy::ReinitMismatched).unwrap();
        assert_eq!((rep.loaded, rep.reinitialised.len()), (sam.named_tensors().count(), 0));
        for ((k, a), (_, b)) in sam.named_tensors().zip(back.named_tensors()) {
            assert!(a.equal(b), "{k}");
        }
        let (_, meta) = crate::nn::weights::read_safetensors_with_metadata(&f).unwrap();
        assert_eq!(serde_json::from_str::<SamConfig>(&meta["sam_config"]).unwrap(), sam.cfg);
        let lvit = crate::nn::lora::Lora::for_config(&vs.root().sub("lora"), &SamConfig::vit_b(), 1).unwrap();
        assert!(sam.forward(&x, Some(&lvit)).unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn class_heads_from_the_single_mask_token() {
        tch::manual_seed(3);
        let official = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny()).unwrap();
        let file: HashMap<String, Tensor> = official.named_tensors().map(|(k, t)| (k.to_string(), t.detach().copy())).collect();
        let sam = Sam::new(&nn::VarStore::new(Device::Cpu).root(), &SamConfig::tiny().with_num_classes(2)).unwrap();
        let rep = sam.load_tensors(file.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), Path::new("official.pth"), HeadPolicy::ReinitMismatched).unwrap();
        assert!(!rep.reinitialised.is_empty());
        let x = Tensor::randn([1, 3, 128, 128], (Kind::Float, Device::Cpu));
        let before = tch::no_grad(|| sam.forward(&x, None)).unwrap().low_res_logits;
        sam.init_heads_from_token(&file, Path::new("official.pth"), 0).unwrap();
        let tokens = sam.tensor("mask_decoder.mask_tokens.weight").unwrap();
        for i in 0..3 {
            assert!(tokens.get(i).equal(&file["mask_decoder.mask_tokens.weight"].get(0)));
        }
        assert!(sam.tensor("mask_decoder.output_hypernetworks_mlps.2.layers.1.weight").unwrap().equal(&file["mask_decoder.output_hypernetworks_mlps.0.layers.1.weight"]));
        // Identical tokens and heads give every class the same logits (the probabilities start
        // uniform; the loss separates them), unlike the random heads before.
        let after = tch::no_grad(|| sam.forward(&x, None)).unwrap().low_res_logits;
        for c in 1..3 {
            let d = f64::try_from((after.narrow(1, c, 1) - after.narrow(1, 0, 1)).abs().max()).unwrap();
            assert!(d < 1e-4, "class {c}: {d}");
        }
        assert!(!before.allclose(&after, 1e-3, 1e-3, false));
        let mut short: HashMap<String, Tensor> = file.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        short.remove("mask_decoder.output_hypernetworks_mlps.0.layers.2.bias");
        let err = sam.init_heads_from_token(&short, Path::new("x.pth"), 0).unwrap_err().to_string();
        assert!(err.contains("x.pth") && err.contains("layers.2.bias is missing"), "{err}");
    }

    #[test]
    fn rel_pos_helpers_match_their_definitions() {
        // get_rel_pos with equal sizes indexes table[i - j + (k - 1)].
        let table = Tensor::arange(5, (Kind::Float, Device::Cpu)).view([5, 1]);
        let r = image_encoder::get_rel_pos(3, 3, &table).view([3, 3]);
        assert_eq!(Vec::<f32>::try_from(r.flatten(0, -1)).unwrap(), vec![2., 1., 0., 3., 2., 1., 4., 3., 2.]);
        // Window partition and unpartition are inverse, padding included.
        let x = Tensor::randn([2, 5, 7, 3], (Kind::Float, Device::Cpu));
        let (w, pad) = image_encoder::window_partition(&x, 3);
        assert_eq!(pad, (6, 9));
        assert_eq!(w.size(), vec![2 * 2 * 3, 3, 3, 3]);
        assert!(image_encoder::window_unpartition(&w, 3, pad, (5, 7)).equal(&x));
        // Resizing a linear ramp along the table length keeps it linear.
        let ramp = Tensor::arange(9, (Kind::Float, Device::Cpu)).view([9, 1]).repeat([1, 2]);
        let r = resize_rel_pos(&ramp, 5);
        assert_eq!(r.size(), vec![5, 2]);
        let v = Vec::<f32>::try_from(r.select(1, 0)).unwrap();
        for w in v.windows(2) {
            assert!((w[1] - w[0] - 1.8).abs() < 1e-5, "{v:?}");
        }
    }
}
