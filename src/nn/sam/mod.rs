//! Segment Anything (SAM) in tch, mirroring the official `segment-anything` modules
//! (`modeling/*.py`, `build_sam.py`) so that tensor names equal the official state-dict keys
//! (`image_encoder.blocks.0.attn.qkv.weight`, `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`,
//! `mask_decoder.output_hypernetworks_mlps.0.layers.0.weight`, ...) and official checkpoints
//! load one to one.
//!
//! Differences from the official `Sam` module, all following SAMed / SFR:
//! - the mask decoder is per class: `num_classes + 1` mask tokens and every token's mask is
//!   returned (token 0 = background);
//! - no prompts by default (`SamPrompt::None`): empty sparse embedding, `no_mask_embed` as
//!   dense embedding; `SamPrompt::CanvasBox` (off in every preset) gives one constant box around
//!   the whole canvas instead;
//! - no pixel mean/std normalisation and no padding: the input is already a square image of
//!   `image_size` pixels in the range the encoder expects (`SamConfig::pixel_input`: z-scored,
//!   or [0, 1] for LiteMedSAM; the SAM stage maps patches to it). (`pixel_mean`/`pixel_std`
//!   are non-persistent buffers in the official module, so they are not part of its state
//!   dict either.)
//! - `image_size` may differ from the checkpoint's 1024: see [`checkpoint::load_into`].
//!
//! Files: `config.rs` (SamConfig, TinyVitConfig), `checkpoint.rs` (which file, and how a state
//! dict goes in: head policy, load report, resizing, variant detection), the modules of each
//! part, and here `Sam` and its forward pass.
pub mod checkpoint;
pub mod config;
pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod transformer;

use crate::error::{Error, Result};
use crate::nn::layers::{ParamEntry, Params};
use crate::nn::lora::{Lora, LoraHost, QkvBlock, QkvBlocks};
use image_encoder::ImageEncoderViT;
use mask_decoder::MaskDecoder;
use prompt_encoder::PromptEncoder;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};
use tiny_vit::TinyVit;

// The model's configuration and its checkpoint handling live in their own files; their names
// stay reachable here (`sam::SamConfig`, `sam::HeadPolicy`, ...).
pub use checkpoint::{detect_config, is_decoder_head, resize_pos_embed, resize_rel_pos, HeadPolicy, LoadReport};
pub use config::{PixelInput, SamConfig, TinyVitConfig};

/// Output of the mask decoder for a batch of images.
#[derive(Debug)]
pub struct SamOutput {
    /// [B, num_classes + 1, 4g, 4g] logits (256×256 for a 1024 input); channel 0 = background.
    pub low_res_logits: Tensor,
    /// [B, num_classes + 1] predicted IoU of each mask.
    pub iou_predictions: Tensor,
}

/// What the mask decoder is prompted with (`sam.prompt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamPrompt {
    /// No prompt: an empty sparse embedding and the `no_mask_embed` dense embedding (the
    /// paper's and SAMed's automatic segmentation).
    #[default]
    None,
    /// One box around the whole canvas, the same for every canvas: the decoder sees the two
    /// box-corner tokens it was trained with (LiteMedSAM only ever saw box prompts), and they
    /// carry no information about where the structure is.
    CanvasBox,
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

    /// The number of attention blocks, LoRA's blocks in order.
    pub fn num_attention_blocks(&self) -> usize {
        match self {
            ImageEncoder::Vit(e) => e.blocks.len(),
            ImageEncoder::TinyVit(e) => e.num_attention_blocks(),
        }
    }

    /// The encoder's state before attention block `upto` (see `suffix`).
    pub fn prefix(&self, x: &Tensor, lora: Option<&Lora>, upto: usize) -> Tensor {
        match self {
            ImageEncoder::Vit(e) => e.prefix(x, lora, upto),
            ImageEncoder::TinyVit(e) => e.prefix(x, lora, upto),
        }
    }

    /// Attention blocks `from..` and the neck on `prefix(x, lora, from)`: together they are
    /// `forward`, bit for bit, so the frozen part before LoRA'd blocks can be computed once.
    pub fn suffix(&self, state: &Tensor, lora: Option<&Lora>, from: usize) -> Tensor {
        match self {
            ImageEncoder::Vit(e) => e.suffix(state, lora, from),
            ImageEncoder::TinyVit(e) => e.suffix(state, lora, from),
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

    /// Image embedding [B, prompt_embed_dim, g, g] of images [B, 3, S, S] (already in the
    /// encoder's `pixel_input` range).
    pub fn encode_image(&self, images: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let x = self.check_images(images)?;
        if let Some(l) = lora {
            l.check_fits(&self.cfg)?;
        }
        Ok(self.image_encoder.forward(&x, lora))
    }

    /// The image encoder's state before attention block `upto` of images [B, 3, S, S]
    /// (`ImageEncoder::prefix`); `encode_suffix` finishes the embedding.
    pub fn encode_prefix(&self, images: &Tensor, lora: Option<&Lora>, upto: usize) -> Result<Tensor> {
        let x = self.check_images(images)?;
        self.check_block_index(upto)?;
        if let Some(l) = lora {
            l.check_fits(&self.cfg)?;
        }
        Ok(self.image_encoder.prefix(&x, lora, upto))
    }

    /// The image embedding [B, C, g, g] from a state `encode_prefix(.., from)` returned.
    pub fn encode_suffix(&self, state: &Tensor, lora: Option<&Lora>, from: usize) -> Result<Tensor> {
        self.check_block_index(from)?;
        if let Some(l) = lora {
            l.check_fits(&self.cfg)?;
        }
        Ok(self.image_encoder.suffix(state, lora, from))
    }

    fn check_block_index(&self, i: usize) -> Result<()> {
        let n = self.image_encoder.num_attention_blocks();
        if i > n {
            return Err(Error::invalid(format!("SAM '{}' has {n} attention blocks, no block {i} to split the encoder at", self.cfg.name)));
        }
        Ok(())
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

    /// The mask decoder under `prompt` ([`SamPrompt`]).
    pub fn decode_prompted(&self, image_embeddings: &Tensor, prompt: SamPrompt) -> Result<SamOutput> {
        match prompt {
            SamPrompt::None => self.decode(image_embeddings),
            SamPrompt::CanvasBox => {
                let b = image_embeddings.size().first().copied().unwrap_or(0);
                let edge = (self.cfg.image_size as f64 - 1.0).max(0.0);
                let boxes = Tensor::from_slice(&[0.0f32, 0.0, edge as f32, edge as f32]).reshape([1, 4]).repeat([b, 1]);
                let kind = self.prompt_encoder.no_mask_embed.kind();
                self.decode_with_boxes(image_embeddings, &boxes.to_device(self.device).to_kind(kind))
            }
        }
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

    /// Images [B, 3, S, S] (already in the `pixel_input` range; no SAM pixel normalisation) -> per-class
    /// low-resolution logits and IoU predictions. `lora` adds its update to every encoder qkv.
    pub fn forward(&self, images: &Tensor, lora: Option<&Lora>) -> Result<SamOutput> {
        self.forward_prompted(images, lora, SamPrompt::None)
    }

    /// [`Sam::forward`] with the decoder under `prompt`.
    pub fn forward_prompted(&self, images: &Tensor, lora: Option<&Lora>, prompt: SamPrompt) -> Result<SamOutput> {
        let emb = self.encode_image(images, lora)?;
        self.decode_prompted(&emb, prompt)
    }

    /// Reads a checkpoint (`.pth` state dict as written by `torch.save`, or `.safetensors`) and
    /// loads it with [`Sam::load_tensors`].
    pub fn load_checkpoint(&self, file: &Path, policy: HeadPolicy) -> Result<LoadReport> {
        let tensors = crate::nn::weights::load_tensors(file)?;
        self.load_tensors(tensors, file, policy)
    }

    /// Copies a state dict into the model: [`checkpoint::load_into`] (every key must match,
    /// except for image-size resizing and per-class decoder heads, per `policy`). Nothing is
    /// modified when an error is returned.
    pub fn load_tensors(&self, tensors: Vec<(String, Tensor)>, source: &Path, policy: HeadPolicy) -> Result<LoadReport> {
        checkpoint::load_into(&self.entries, &self.cfg, tensors, source, policy)
    }

    /// Starts every class's mask token, hypernetwork MLP and IoU row from the checkpoint's mask
    /// token `token`: [`checkpoint::init_heads_from_token`]. Nothing is changed on error.
    pub fn init_heads_from_token(&self, file: &HashMap<String, Tensor>, source: &Path, token: i64) -> Result<()> {
        checkpoint::init_heads_from_token(&self.entries, &self.cfg, file, source, token)
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

    /// Writes everything fine-tuning changes — the LoRA tensors (`lora.*`) and the prompt encoder
    /// and mask decoder under their official keys (`prompt_encoder.*`, `mask_decoder.*`) — in one
    /// safetensors file, the content SAMed saves.
    pub fn save_finetuned(&self, file: &Path, lora: &Lora) -> Result<()> {
        let mut named = lora.file_tensors();
        for (k, t) in self.named_tensors() {
            if k.starts_with("prompt_encoder.") || k.starts_with("mask_decoder.") {
                named.push((k.to_string(), t.detach()));
            }
        }
        let mut meta = lora.metadata();
        meta.extend(self.metadata());
        crate::nn::weights::save_safetensors(file, &named, &meta)
    }

    /// Reads a file written by [`Sam::save_finetuned`] (or a SAMed LoRA checkpoint): the LoRA tensors and
    /// every prompt-encoder and mask-decoder tensor of `sam`, which must all be present with the
    /// model's shapes (same number of classes). Nothing is changed on error.
    pub fn load_finetuned(&self, file: &Path, lora: &Lora) -> Result<()> {
        let tensors: HashMap<String, Tensor> = crate::nn::weights::load_tensors(file)?.into_iter().collect();
        let mut plan = Vec::new();
        let mut problems = Vec::new();
        for (k, t) in self.named_tensors() {
            if !(k.starts_with("prompt_encoder.") || k.starts_with("mask_decoder.")) {
                continue;
            }
            match tensors.get(k) {
                Some(f) if f.size() == t.size() && f.is_floating_point() => plan.push((t, f)),
                Some(f) => problems.push(format!("{k}: {:?} in the file, {:?} in the model", f.size(), t.size())),
                None => problems.push(format!("{k}: missing")),
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(8);
            return Err(Error::format(file, format!("fine-tuned SAM weights do not fit SAM '{}' with {} classes ({n} problems): {}", self.cfg.name, self.cfg.num_classes, problems.join("; "))));
        }
        lora.load_from(&tensors, file)?;
        tch::no_grad(|| -> Result<()> {
            for (t, f) in plan {
                t.shallow_clone().f_copy_(&f.to_kind(t.kind()).to_device(t.device()))?;
            }
            Ok(())
        })
    }
}

impl QkvBlocks for Sam {
    fn qkv_blocks(&self) -> Vec<QkvBlock> {
        self.cfg.qkv_blocks()
    }
    fn describe(&self) -> String {
        self.cfg.describe()
    }
}

/// LoRA adapts the image encoder's fused qkv projections: ViT blocks in order, or a TinyViT's
/// attention blocks of stages 1–3.
impl LoraHost for Sam {
    fn qkv_weights(&self) -> Vec<&Tensor> {
        match &self.image_encoder {
            ImageEncoder::Vit(e) => e.blocks.iter().map(|b| &b.attn.qkv.weight).collect(),
            ImageEncoder::TinyVit(t) => t.attentions().into_iter().map(|a| &a.qkv.weight).collect(),
        }
    }
    fn freeze_adapted(&self) {
        self.set_image_encoder_trainable(false);
    }
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

#[cfg(test)]
mod tests;
