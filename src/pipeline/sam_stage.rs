//! The stitching and fine-tuning modules: SAM with LoRA is fine-tuned on stitched labelled
//! patches, then pseudo-labels unlabelled volumes.
//!
//! The SAM stage's patch is the V-Net's, or with `sam.fill_canvas` as many slices as the canvas
//! grid holds (`TrainConfig::sam_patch_zyx`).
//!
//! Fine-tuning: every step takes `batch` random labelled patches (the SAM stage's patch),
//! augments them (rot90/flip, Bezier intensity curve), stitches image and label onto an S×S
//! canvas (no resampling; label padding 255 is ignored by the loss), runs SAM without prompts
//! (or, with `sam.prompt: canvas_box`, one box around the whole canvas, in fine-tuning and
//! pseudo-labelling alike)
//! and minimises 0.5·(CE + Dice) of the upsampled per-class logits. AdamW (lr, wd from the
//! config, betas 0.9/0.999) with poly decay (1 - it/max)^0.9 (after `sam.warmup` steps of
//! linear warm-up, none in the presets: `finetune_lr`) on LoRA + prompt encoder + mask
//! decoder; the image encoder is frozen when it starts from a checkpoint. With
//! `sam.frozen_encoder_canvases` N > 0 and a pretrained SAM, N augmented canvases are encoded
//! once by the frozen encoder (no LoRA) and only the prompt encoder and mask decoder train, on
//! their cached embeddings (the CPU recipe); with `sam.lora_last_blocks` K > 0 the cache holds
//! the encoder's state before its last K attention blocks, and LoRA on those K blocks trains
//! with the decoder (each step runs the K blocks and the neck). Without a checkpoint
//! (no pretrained SAM available) a frozen random encoder would be meaningless, so the encoder is
//! trained too; this is logged loudly.
//!
//! Pseudo-labelling: each unlabelled volume is covered by windows of the SAM stage's patch
//! (stride half a patch); each window is stitched, segmented by SAM and unstitched to per-voxel class
//! probabilities; overlapping windows are averaged. Computing this once per volume (instead of
//! per random crop, as the reference does) is what makes it affordable. The label is their
//! argmax, optionally grown to the labelled cases' foreground fraction
//! (`sam.match_labeled_fraction`) and reduced to its largest pieces (`sam.largest_component`);
//! both are off in every preset (docs/experiments/notes.md, "Growing the pseudo-labels").
use crate::error::{Error, Result};
use crate::infer::{argmax, keep_largest_components, SlidingWindow, Weighting};
use crate::job::Reporter;
use crate::nn::autocast::cpu_bf16;
use crate::nn::loss::{ce_dice, finite_loss};
use crate::nn::lora::Lora;
use crate::nn::sam::checkpoint::{self, Resolved};
use crate::nn::sam::{class_probabilities, detect_config, upscale_logits, HeadPolicy, PixelInput, Sam, SamConfig};
use std::collections::HashMap;
use crate::pipeline::config::{Bf16, SamStage, TrainConfig};
use crate::pipeline::guard::class_fractions;
use crate::pipeline::data::{random_bezier, random_crop, random_rot_flip, Rng, Sample};
use crate::stitch::{stitch_image, stitch_labels, unstitch_probabilities, StitchLayout};
use ndarray::{Array2, Array3, Array4, Axis};
use rand::{RngExt, SeedableRng};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The fine-tuning learning rate at step `it` of `iterations`: `sam.warmup` steps of linear
/// warm-up, then the paper's poly decay (1 - t)^0.9 over the steps after them (without warm-up,
/// exactly the paper's `lr·(1 - it/iterations)^0.9`).
pub fn finetune_lr(s: &SamStage, it: usize, iterations: usize) -> f64 {
    let w = s.warmup.min(iterations);
    if it < w {
        return s.lr * (it + 1) as f64 / w as f64;
    }
    s.lr * (1.0 - (it - w) as f64 / (iterations - w).max(1) as f64).powf(0.9)
}

/// A fine-tunable SAM: the model, its LoRA and the VarStore that owns both.
pub struct SamModule {
    pub vs: nn::VarStore,
    pub sam: Sam,
    pub lora: Lora,
    pub layout: StitchLayout,
    /// The SAM stage's patch in voxels, [z, y, x] (`TrainConfig::sam_patch_zyx`); the layout
    /// stitches it magnified `scale`× in-plane.
    pub patch: [usize; 3],
    pub scale: usize,
    /// The checkpoint SAM was loaded from (None = random weights).
    pub checkpoint: Option<Resolved>,
    /// Embeddings and labels of the cached canvases (frozen-encoder fine-tuning), kept across
    /// SFR+ rounds only for the labelled set they were made from.
    cache: Option<(usize, Tensor, Tensor)>,
}

/// A look at SAM during its first fine-tuning, for diagnostics such as `sfr demo
/// --pseudo-label-curve`: `call` gets the step, the module as it is after that many steps, the
/// config and the unlabelled volumes (normalised, on the training grid), at `points` steps spread
/// evenly from 0 (before the first step) to the last. It must only read the module: fine-tuning
/// goes on exactly as without it (no random draw, no gradient).
#[derive(Clone)]
pub struct SamProbe {
    pub points: usize,
    pub call: std::sync::Arc<dyn Fn(usize, &SamModule, &TrainConfig, &[Sample]) -> Result<()> + Send + Sync>,
}

/// The steps at which a probe of `points` points looks, over `iterations` steps: 0, the last, and
/// evenly between (fewer when there are fewer steps than points).
pub fn probe_steps(points: usize, iterations: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = match points {
        0 => vec![],
        1 => vec![iterations],
        p => (0..p).map(|k| ((k * iterations) as f64 / (p - 1) as f64).round() as usize).collect(),
    };
    steps.dedup();
    steps
}

/// A probe bound to one fine-tuning: its steps and what to call there.
pub struct FinetuneProbe<'a> {
    pub steps: Vec<usize>,
    pub call: &'a dyn Fn(usize, &SamModule) -> Result<()>,
}

impl FinetuneProbe<'_> {
    /// Calls the probe at its steps, timed apart from fine-tuning (stage "sam_probe").
    fn at(&self, step: usize, m: &SamModule, reporter: &Reporter) -> Result<()> {
        if self.steps.contains(&step) {
            reporter.aside("sam_probe", || (self.call)(step, m))?;
        }
        Ok(())
    }
}

/// A labelled volume for fine-tuning: image and (pseudo-)label.
pub struct LabeledVolume<'a> {
    pub image: &'a Array3<f32>,
    pub label: &'a Array3<u8>,
}

/// Pseudo-labels of one unlabelled volume.
pub struct PseudoLabel {
    pub probabilities: Array4<f32>,
    pub label: Array3<u8>,
    /// SFR+ confidence: mean over voxels of the max class probability.
    pub confidence: f64,
}

impl SamModule {
    /// Builds SAM for `num_classes` classes (background included) at the configured canvas,
    /// loading the checkpoint when one is given.
    pub fn new(cfg: &TrainConfig, num_classes: usize, device: Device, reporter: &Reporter) -> Result<SamModule> {
        let s = &cfg.sam;
        let stitch_err = |e: Error| Error::invalid(format!("config: the patch {:?} cannot be stitched at sam.image_size {}: {e}", cfg.patch, s.image_size));
        let patch = cfg.sam_patch_zyx().map_err(stitch_err)?;
        let layout = StitchLayout::for_shape(&cfg.sam_canvas_patch_zyx().map_err(stitch_err)?, s.image_size).map_err(stitch_err)?;
        // The checkpoint (see nn::sam::checkpoint for the order) decides the variant when it is
        // `auto`; without one, `auto` is the small `tiny` ViT, the only one cheap enough to train
        // from scratch on a CPU.
        let resolved = checkpoint::resolve(s.checkpoint.as_deref(), &s.variant)?;
        let (file, base) = match &resolved {
            Some(r) => {
                let tensors: HashMap<String, Tensor> = crate::nn::weights::load_tensors(&r.path)?.into_iter().collect();
                let base = if s.variant == "auto" {
                    detect_config(&tensors).ok_or_else(|| Error::format(&r.path, "not a SAM state dict (no image_encoder.* / mask_decoder.mask_tokens.weight keys of SAM, MobileSAM or LiteMedSAM)"))?
                } else {
                    SamConfig::from_name(&s.variant)?
                };
                (Some((r, tensors)), base)
            }
            None => (None, SamConfig::from_name(if s.variant == "auto" { "tiny" } else { &s.variant })?),
        };
        let scfg = base.with_num_classes(num_classes as i64 - 1).with_image_size(s.image_size as i64);
        let vs = nn::VarStore::new(device);
        let sam = Sam::new(&vs.root(), &scfg)?;
        let pretrained = match file {
            Some((r, tensors)) => {
                let heads: HashMap<String, Tensor> = if s.class_heads_from_mask_token {
                    tensors.iter().filter(|(k, _)| crate::nn::sam::is_decoder_head(k)).map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
                } else {
                    HashMap::new()
                };
                let report = sam.load_tensors(tensors.into_iter().collect(), &r.path, HeadPolicy::ReinitMismatched)?;
                if s.class_heads_from_mask_token {
                    sam.init_heads_from_token(&heads, &r.path, 0)?;
                    reporter.message("every class head starts from the checkpoint's single-mask token");
                }
                reporter.message(&format!(
                    "SAM {} loaded from {} ({}; {} tensors; {} resized for image size {}; {} decoder-head tensors re-initialised for {} classes)",
                    scfg.name,
                    r.path.display(),
                    r.source,
                    report.loaded,
                    report.resized.len(),
                    s.image_size,
                    report.reinitialised.len(),
                    num_classes
                ));
                true
            }
            None => {
                log::warn!("{}", checkpoint::random_warning(&scfg.name));
                reporter.message(&format!("no SAM checkpoint: SAM '{}' starts from RANDOM weights (see the log; ./scripts/setup.sh fetches LiteMedSAM)", scfg.name));
                false
            }
        };
        let blocks = sam.image_encoder.num_attention_blocks();
        if s.lora_last_blocks > blocks {
            return Err(Error::invalid(format!("config: sam.lora_last_blocks {} exceeds the {blocks} attention blocks of SAM '{}'", s.lora_last_blocks, scfg.name)));
        }
        let lora = Lora::new(&vs.root().sub("lora"), &sam, s.lora_rank as i64)?;
        if !pretrained {
            sam.set_image_encoder_trainable(true);
        }
        // Said, not silently dropped: the option only splits a frozen pretrained encoder.
        if s.lora_last_blocks > 0 && !(pretrained && s.frozen_encoder_canvases > 0) {
            let why = if pretrained { "sam.frozen_encoder_canvases is 0, so LoRA trains on every block" } else { "SAM starts from random weights, so its whole encoder trains" };
            let text = format!("sam.lora_last_blocks {} is ignored: {why}", s.lora_last_blocks);
            log::warn!("{text}");
            reporter.message(&text);
        }
        if device == Device::Cpu && s.bf16 != Bf16::Off {
            // Said either way: `auto` makes the same config compute differently on another CPU.
            let text = match (s.bf16.enabled(), s.bf16) {
                (true, Bf16::Auto) => "SAM stage in bfloat16 autocast (sam.bf16 auto: this CPU has AVX512-BF16)",
                (true, _) => "SAM stage in bfloat16 autocast (sam.bf16)",
                (false, _) => "SAM stage in float32 (sam.bf16 auto: this CPU has no AVX512-BF16)",
            };
            reporter.message(text);
        }
        Ok(SamModule { vs, sam, lora, layout, patch, scale: s.scale, checkpoint: resolved, cache: None })
    }

    /// [B, 3, S, S] canvases of a batch of (z-scored) patches, grey repeated to 3 channels, in
    /// the intensity range the encoder was trained on (`SamConfig::pixel_input`).
    fn canvases(&self, images: &[Array3<f32>]) -> Result<Tensor> {
        let s = self.layout.canvas as i64;
        let mut buf: Vec<f32> = Vec::with_capacity(images.len() * (s * s) as usize);
        for img in images {
            let img = magnify_image(img, self.scale);
            let img = img.as_ref();
            let c: Array2<f32> = match self.sam.cfg.pixel_input {
                PixelInput::Zscore => stitch_image(&img.view(), &self.layout)?,
                PixelInput::Unit => stitch_image(&crate::volume::unit_range(&img.view()).view(), &self.layout)?,
            };
            buf.extend(c.iter());
        }
        let t = Tensor::from_slice(&buf).view([images.len() as i64, 1, s, s]).to_device(self.vs.device());
        Ok(t.expand([images.len() as i64, 3, s, s], false).contiguous())
    }

    /// One random training sample: an augmented patch stitched to a canvas, and its label.
    fn random_sample(&self, cfg: &TrainConfig, data: &[LabeledVolume], rng: &mut Rng) -> Result<(Array3<f32>, Array2<u8>)> {
        let v = &data[rng.random_range(0..data.len())];
        let (mut img, mut lab) = random_crop(rng, &v.image.view(), &[&v.label.view()], self.patch);
        if cfg.rot_flip {
            random_rot_flip(rng, &mut img, &mut lab);
        }
        if cfg.sam.bezier {
            random_bezier(rng, &mut img);
        }
        let l = stitch_labels(&magnify_label(&lab[0], self.scale).view(), &self.layout)?;
        Ok((img, l))
    }

    fn label_tensor(&self, labs: &[Array2<u8>]) -> Tensor {
        let size = self.layout.canvas as i64;
        let mut lbuf: Vec<u8> = Vec::with_capacity(labs.len() * (size * size) as usize);
        for l in labs {
            lbuf.extend(l.iter());
        }
        Tensor::from_slice(&lbuf).view([labs.len() as i64, size, size]).to_kind(Kind::Int64).to_device(self.vs.device())
    }

    /// Whether fine-tuning uses cached embeddings of a frozen pretrained encoder.
    pub fn frozen_encoder(&self, cfg: &TrainConfig) -> bool {
        cfg.sam.frozen_encoder_canvases > 0 && self.checkpoint.is_some()
    }

    /// Frozen-encoder fine-tuning: encodes `frozen_encoder_canvases` augmented canvases once
    /// (again only when the labelled set grew, as in SFR+), then trains the prompt encoder and
    /// mask decoder on random batches of the cached embeddings.
    fn finetune_cached(&mut self, cfg: &TrainConfig, data: &[LabeledVolume], iterations: usize, rng: &mut Rng, reporter: &Reporter, probe: Option<&FinetuneProbe>) -> Result<()> {
        let s = &cfg.sam;
        let n = s.frozen_encoder_canvases;
        let size = self.layout.canvas as i64;
        // LoRA'd last blocks (`sam.lora_last_blocks`): the cache holds the encoder's state
        // before them, and every step runs them and the neck. Without them it holds the
        // embedding itself (neck included), and a step is a decoder pass.
        let blocks = self.sam.image_encoder.num_attention_blocks();
        let split = blocks - s.lora_last_blocks;
        let lora_tail = split < blocks;
        if self.cache.as_ref().is_none_or(|c| c.0 != data.len()) {
            self.sam.set_image_encoder_trainable(false);
            let what = if lora_tail { format!("frozen encoder up to block {split} of {blocks}") } else { "frozen encoder".to_string() };
            reporter.stage("encode", n as u64, &format!("SAM {} {what}: {n} augmented canvases encoded once", self.sam.cfg.name))?;
            let (mut embs, mut labs) = (Vec::new(), Vec::new());
            let mut done = 0;
            while done < n {
                crate::threads::tick();
                let b = s.batch.min(n - done);
                let mut imgs = Vec::with_capacity(b);
                let mut ls = Vec::with_capacity(b);
                for _ in 0..b {
                    let (i, l) = self.random_sample(cfg, data, rng)?;
                    imgs.push(i);
                    ls.push(l);
                }
                let input = self.canvases(&imgs)?;
                let encoded = cpu_bf16(s.bf16.enabled(), self.vs.device(), || tch::no_grad(|| if lora_tail { self.sam.encode_prefix(&input, Some(&self.lora), split) } else { self.sam.encode_image(&input, None) }))?;
                embs.push(encoded.to_kind(Kind::Float));
                labs.push(self.label_tensor(&ls));
                done += b;
                reporter.step(done as u64, f64::NAN)?;
            }
            self.cache = Some((data.len(), Tensor::cat(&embs, 0), Tensor::cat(&labs, 0)));
        }
        let (_, emb, target) = self.cache.as_ref().expect("cache filled above");
        let (emb, target) = (emb.shallow_clone(), target.shallow_clone());
        let mut opt = nn::AdamW { beta1: 0.9, beta2: 0.999, wd: s.weight_decay, eps: 1e-8, amsgrad: false }.build(&self.vs, s.lr)?;
        let what = if lora_tail { format!("decoder + LoRA r={} on its last {} blocks", s.lora_rank, s.lora_last_blocks) } else { "decoder".to_string() };
        reporter.stage("finetune", iterations as u64, &format!("SAM {} {what} on {n} cached canvases ({}×{} grid on {}²)", self.sam.cfg.name, self.layout.n_row, self.layout.n_col, size))?;
        for it in 0..iterations {
            crate::threads::tick();
            if let Some(p) = probe {
                p.at(it, self, reporter)?;
            }
            opt.set_lr(finetune_lr(s, it, iterations));
            let idx: Vec<i64> = (0..s.batch).map(|_| rng.random_range(0..n) as i64).collect();
            let idx = Tensor::from_slice(&idx).to_device(emb.device());
            let state = emb.index_select(0, &idx);
            // The LoRA'd tail under `sam.bf16` too; the decoder trains in float32.
            let embedding = if lora_tail { cpu_bf16(s.bf16.enabled(), self.vs.device(), || self.sam.encode_suffix(&state, Some(&self.lora), split))?.to_kind(Kind::Float) } else { state };
            let out = self.sam.decode_prompted(&embedding, s.prompt)?;
            let logits = upscale_logits(&out.low_res_logits, (size, size));
            let loss = ce_dice(&logits, &target.index_select(0, &idx));
            opt.zero_grad();
            loss.backward();
            opt.step();
            reporter.step(it as u64 + 1, finite_loss(&loss, "SAM fine-tuning", it)?)?;
        }
        if let Some(p) = probe {
            p.at(iterations, self, reporter)?;
        }
        Ok(())
    }

    /// Fine-tunes on `data` for `iterations` steps; `probe` looks at the module on its way.
    pub fn finetune(&mut self, cfg: &TrainConfig, data: &[LabeledVolume], iterations: usize, seed: u64, reporter: &Reporter, probe: Option<&FinetuneProbe>) -> Result<()> {
        if data.is_empty() {
            return Err(Error::invalid("SAM fine-tuning needs at least one labelled volume"));
        }
        let s = &cfg.sam;
        let mut rng = Rng::seed_from_u64(seed);
        if self.frozen_encoder(cfg) {
            return self.finetune_cached(cfg, data, iterations, &mut rng, reporter, probe);
        }
        let mut opt = nn::AdamW { beta1: 0.9, beta2: 0.999, wd: s.weight_decay, eps: 1e-8, amsgrad: false }.build(&self.vs, s.lr)?;
        let size = self.layout.canvas as i64;
        reporter.stage(
            "finetune",
            iterations as u64,
            &format!("SAM {} + LoRA r={} on {} stitched volumes ({}×{} grid on {}²)", self.sam.cfg.name, s.lora_rank, data.len(), self.layout.n_row, self.layout.n_col, size),
        )?;
        for it in 0..iterations {
            crate::threads::tick();
            if let Some(p) = probe {
                p.at(it, self, reporter)?;
            }
            opt.set_lr(finetune_lr(s, it, iterations));
            let mut imgs = Vec::with_capacity(s.batch);
            let mut labs = Vec::with_capacity(s.batch);
            for _ in 0..s.batch {
                let (img, lab) = self.random_sample(cfg, data, &mut rng)?;
                imgs.push(img);
                labs.push(lab);
            }
            let input = self.canvases(&imgs)?;
            let target = self.label_tensor(&labs);
            let out = cpu_bf16(s.bf16.enabled(), self.vs.device(), || self.sam.forward_prompted(&input, Some(&self.lora), s.prompt))?;
            let logits = upscale_logits(&out.low_res_logits.to_kind(Kind::Float), (size, size));
            let loss = ce_dice(&logits, &target);
            opt.zero_grad();
            loss.backward();
            opt.step();
            reporter.step(it as u64 + 1, finite_loss(&loss, "SAM fine-tuning", it)?)?;
        }
        if let Some(p) = probe {
            p.at(iterations, self, reporter)?;
        }
        Ok(())
    }

    /// Per-voxel class probabilities of a normalised volume (see the module doc). A cancel
    /// through `reporter` is honoured between batches of windows (a big volume takes minutes).
    pub fn pseudo_label(&self, cfg: &TrainConfig, image: &Array3<f32>, reporter: Option<&Reporter>) -> Result<PseudoLabel> {
        let patch = self.patch;
        let k = self.scale as i64;
        let sw = SlidingWindow { patch, stride: patch.map(|p| (p / 2).max(1)), weighting: Weighting::Mean, batch: cfg.sam.batch };
        let size = self.layout.canvas as i64;
        let probs = sw.run(&image.view(), self.vs.device(), None, |x| {
            // x: [B, 1, pz, py, px] -> stitched -> SAM -> unstitched log-probabilities, so the
            // sliding window's softmax gives back SAM's probabilities.
            if let Some(r) = reporter {
                r.check()?;
            }
            let b = x.size()[0];
            let host = x.to_device(Device::Cpu).contiguous();
            let mut patches = Vec::with_capacity(b as usize);
            for i in 0..b {
                let t = host.get(i).get(0);
                let mut v = vec![0f32; t.numel()];
                t.copy_data(&mut v, t.numel());
                patches.push(Array3::from_shape_vec((patch[0], patch[1], patch[2]), v).map_err(|e| Error::invalid(e.to_string()))?);
            }
            let input = self.canvases(&patches)?;
            let out = cpu_bf16(cfg.sam.bf16.enabled(), self.vs.device(), || tch::no_grad(|| self.sam.forward_prompted(&input, Some(&self.lora), cfg.sam.prompt)))?;
            let p = class_probabilities(&out.low_res_logits.to_kind(Kind::Float), (size, size)).to_device(Device::Cpu).contiguous();
            let c = p.size()[1] as usize;
            let mut all = Vec::with_capacity(b as usize);
            for i in 0..b {
                let pi = p.get(i);
                let mut v = vec![0f32; pi.numel()];
                pi.copy_data(&mut v, pi.numel());
                let canvas = Array3::from_shape_vec((c, size as usize, size as usize), v).map_err(|e| Error::invalid(e.to_string()))?;
                let vol = unstitch_probabilities(&canvas.view(), &self.layout)?;
                let [d, h, w] = self.layout.volume_shape().map(|v| v as i64);
                let mut t = Tensor::from_slice(vol.as_slice().unwrap()).view([c as i64 * d, 1, h, w]);
                if k > 1 {
                    // Back to the voxel grid: the mean over each voxel's k×k magnified pixels.
                    t = t.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>);
                }
                all.push(t.view([c as i64, patch[0] as i64, patch[1] as i64, patch[2] as i64]));
            }
            Ok(Tensor::stack(&all, 0).clamp_min(1e-8).log())
        })?;
        let label = argmax(&probs);
        let maxes = probs.fold_axis(Axis(0), 0f32, |a, &b| a.max(b));
        let confidence = maxes.iter().map(|&v| v as f64).sum::<f64>() / maxes.len() as f64;
        Ok(PseudoLabel { probabilities: probs, label, confidence })
    }
}

/// Fine-tunes SAM on the labelled samples and pseudo-labels the unlabelled ones (SFR); with
/// SFR+ enabled, alternates: after each round, unlabelled samples whose confidence reaches tau
/// join SAM's fine-tuning set with their pseudo-labels, and SAM is fine-tuned again (half the
/// iterations, continuing) before the next pseudo-labelling; a confident sample whose
/// pseudo-label the guard rejects (`pipeline::guard`) is not absorbed. Returns the pseudo-labels
/// (index aligned with `unlabeled`) and, per sample, whether it was absorbed as confident.
pub fn run_sam_stage(
    cfg: &TrainConfig,
    num_classes: usize,
    labeled: &[Sample],
    unlabeled: &[Sample],
    device: Device,
    reporter: &Reporter,
    probe: Option<&SamProbe>,
) -> Result<(SamModule, Vec<PseudoLabel>, Vec<bool>)> {
    // libtorch's generator is global: seed it here, so that the SAM's fresh weights and every
    // later draw depend on the run's seed only, not on what the process did before.
    tch::manual_seed(cfg.seed as i64);
    let mut sam = SamModule::new(cfg, num_classes, device, reporter)?;
    let rounds = if cfg.sfr_plus.enabled { cfg.sfr_plus.rounds.max(1) } else { 1 };
    let guard = crate::pipeline::guard::Guard::from_config(cfg, labeled, num_classes);
    // What `sam.match_labeled_fraction` grows to: the labelled cases' own, not SFR+'s absorbed
    // pseudo-labels (those would only echo SAM).
    let labeled_fraction = labeled_foreground_fraction(labeled);
    let mut confident = vec![false; unlabeled.len()];
    let mut pseudo: Vec<PseudoLabel> = vec![];
    for round in 0..rounds {
        let mut set: Vec<LabeledVolume> = labeled.iter().map(|s| LabeledVolume { image: &s.image, label: s.label.as_ref().expect("labelled") }).collect();
        for (i, c) in confident.iter().enumerate() {
            if *c {
                set.push(LabeledVolume { image: &unlabeled[i].image, label: &pseudo[i].label });
            }
        }
        let iters = if round == 0 { cfg.sam.iterations } else { cfg.sam.iterations / 2 };
        // The probe looks at the first fine-tuning only (SFR+'s later rounds continue it).
        let call = |step: usize, m: &SamModule| probe.map_or(Ok(()), |p| (p.call)(step, m, cfg, unlabeled));
        let bound = probe.filter(|_| round == 0).map(|p| FinetuneProbe { steps: probe_steps(p.points, iters), call: &call });
        sam.finetune(cfg, &set, iters, cfg.seed.wrapping_add(round as u64), reporter, bound.as_ref())?;
        reporter.stage("pseudolabel", unlabeled.len() as u64, &format!("SAM pseudo-labels for {} unlabelled volumes (round {})", unlabeled.len(), round + 1))?;
        let mut next = Vec::with_capacity(unlabeled.len());
        for (i, u) in unlabeled.iter().enumerate() {
            next.push(sam.pseudo_label(cfg, &u.image, Some(reporter))?);
            reporter.step(i as u64 + 1, f64::NAN)?;
        }
        pseudo = next;
        if cfg.sam.match_labeled_fraction {
            let grown: Vec<usize> = pseudo.iter_mut().map(|p| grow_to_fraction(p, labeled_fraction)).collect();
            reporter.message(&format!(
                "pseudo-labels grown to the labelled cases' foreground fraction ({:.2}%): {} of {} volumes, {} voxels (background probability below {})",
                100.0 * labeled_fraction,
                grown.iter().filter(|&&g| g > 0).count(),
                pseudo.len(),
                grown.iter().sum::<usize>(),
                MATCH_FRACTION_MAX_BACKGROUND
            ));
        }
        if cfg.sam.largest_component {
            let removed: Vec<usize> = pseudo.iter_mut().map(|p| keep_largest_components(&mut p.label, num_classes)).collect();
            reporter.message(&format!(
                "pseudo-labels reduced to their largest connected pieces: {} voxels removed from {} of {} volumes",
                removed.iter().sum::<usize>(),
                removed.iter().filter(|&&r| r > 0).count(),
                pseudo.len()
            ));
        }
        if cfg.sfr_plus.enabled {
            let (mut newly, mut held) = (0, 0);
            for (i, p) in pseudo.iter().enumerate() {
                if !confident[i] && p.confidence >= cfg.sfr_plus.tau {
                    // A confident pseudo-label that the guard rejects would teach SAM the same
                    // mistake for the next round (pipeline::guard).
                    if guard.as_ref().is_some_and(|g| !g.check(&p.label.view()).is_empty()) {
                        held += 1;
                        continue;
                    }
                    confident[i] = true;
                    newly += 1;
                }
            }
            let n_conf = confident.iter().filter(|&&c| c).count();
            let held = if held > 0 { format!(" ({held} more held back by the pseudo-label guard)") } else { String::new() };
            reporter.message(&format!(
                "SFR+ round {}: {newly} more confident samples{held} (tau {}); {n_conf} confident, {} uncertain",
                round + 1,
                cfg.sfr_plus.tau,
                unlabeled.len() - n_conf
            ));
        }
    }
    Ok((sam, pseudo, confident))
}

/// `sam.match_labeled_fraction` never relabels a voxel whose background probability is at
/// least this: a volume whose structure is truly smaller than the labelled cases' (or absent)
/// keeps SAM's confident background.
pub const MATCH_FRACTION_MAX_BACKGROUND: f32 = 0.9;

/// The labelled cases' mean foreground fraction: voxels of any class ≥ 1 over the voxels of the
/// volume, averaged over cases (0 without labelled cases).
pub fn labeled_foreground_fraction(labeled: &[Sample]) -> f64 {
    // Foreground: everything but class 0 (labels hold only their classes, checked on loading).
    let fractions: Vec<f64> = labeled.iter().filter_map(|s| s.label.as_ref()).map(|l| 1.0 - class_fractions(&l.view(), 1)[0]).collect();
    fractions.iter().sum::<f64>() / fractions.len().max(1) as f64
}

/// Grows `p.label` to the foreground fraction `target` (`sam.match_labeled_fraction`): when it
/// covers fewer voxels, its background voxels of lowest background probability (and below
/// `MATCH_FRACTION_MAX_BACKGROUND`) become their most probable foreground class until it
/// covers `target` of the volume. Its probabilities and confidence stay SAM's. Returns the
/// number of voxels relabelled.
pub fn grow_to_fraction(p: &mut PseudoLabel, target: f64) -> usize {
    let classes = p.probabilities.dim().0;
    let have = p.label.iter().filter(|&&v| v > 0).count();
    let want = (target * p.label.len() as f64).round() as usize;
    if classes < 2 || have >= want {
        return 0;
    }
    let background = p.probabilities.index_axis(Axis(0), 0);
    // Candidates: background voxels SAM is not confident of. Only their probabilities are
    // kept (a volume of MRI can hold tens of millions of voxels).
    let mut candidates: Vec<f32> = ndarray::Zip::from(&p.label)
        .and(&background)
        .fold(Vec::new(), |mut acc, &l, &b| {
            if l == 0 && b < MATCH_FRACTION_MAX_BACKGROUND {
                acc.push(b);
            }
            acc
        });
    let k = (want - have).min(candidates.len());
    if k == 0 {
        return 0;
    }
    // The k-th lowest background probability: everything below it grows, and of the voxels
    // equal to it as many as make k.
    let (_, &mut threshold, _) = candidates.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
    let mut ties = k - candidates.iter().filter(|&&b| b < threshold).count();
    let mut grown = 0;
    ndarray::Zip::from(&mut p.label).and(p.probabilities.lanes(Axis(0))).for_each(|l, probs| {
        if *l != 0 || probs[0] > threshold {
            return;
        }
        if probs[0] == threshold {
            if ties == 0 {
                return;
            }
            ties -= 1;
        }
        // The most probable foreground class (the first on a tie, as argmax).
        let mut best = 1;
        for c in 2..classes {
            if probs[c] > probs[best] {
                best = c;
            }
        }
        *l = best as u8;
        grown += 1;
    });
    grown
}

/// Every slice of a [d, h, w] patch magnified `k`× in-plane, bilinear (half-pixel centres, as
/// PyTorch's `align_corners=False`); `k` = 1 borrows the patch.
fn magnify_image(img: &Array3<f32>, k: usize) -> std::borrow::Cow<'_, Array3<f32>> {
    if k == 1 {
        return std::borrow::Cow::Borrowed(img);
    }
    let (d, h, w) = img.dim();
    let t = Tensor::from_slice(img.as_standard_layout().as_slice().expect("standard layout")).view([d as i64, 1, h as i64, w as i64]);
    let up = t.upsample_bilinear2d([(h * k) as i64, (w * k) as i64], false, None, None).contiguous();
    let mut v = vec![0f32; up.numel()];
    up.copy_data(&mut v, up.numel());
    std::borrow::Cow::Owned(Array3::from_shape_vec((d, h * k, w * k), v).expect("shape of the magnified patch"))
}

/// Every slice of a [d, h, w] label magnified `k`× in-plane, nearest: each voxel becomes k×k
/// pixels, exactly the block that `pseudo_label`'s k×k mean brings back to it.
fn magnify_label(lab: &Array3<u8>, k: usize) -> std::borrow::Cow<'_, Array3<u8>> {
    if k == 1 {
        return std::borrow::Cow::Borrowed(lab);
    }
    let (d, h, w) = lab.dim();
    std::borrow::Cow::Owned(Array3::from_shape_fn((d, h * k, w * k), |(z, y, x)| lab[[z, y / k, x / k]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnified_patches_map_back_to_their_voxels() {
        // A label magnified k× (nearest) and reduced by k×k means is the label again.
        let lab = Array3::from_shape_fn((2, 3, 5), |(z, y, x)| ((z + 2 * y + 3 * x) % 3) as u8);
        let up = magnify_label(&lab, 3);
        assert_eq!(up.dim(), (2, 9, 15));
        for ((z, y, x), &v) in up.indexed_iter() {
            assert_eq!(v, lab[[z, y / 3, x / 3]]);
        }
        // An image ramp magnified 2× (bilinear, half-pixel centres): away from the border the
        // mean of each voxel's 2×2 pixels is the voxel's value, and not transposed.
        let img = Array3::from_shape_fn((1, 4, 6), |(_, y, x)| (10 * y + x) as f32);
        let up = magnify_image(&img, 2);
        assert_eq!(up.dim(), (1, 8, 12));
        for y in 1..3 {
            for x in 1..5 {
                let mean = (up[[0, 2 * y, 2 * x]] + up[[0, 2 * y + 1, 2 * x]] + up[[0, 2 * y, 2 * x + 1]] + up[[0, 2 * y + 1, 2 * x + 1]]) / 4.0;
                assert!((mean - img[[0, y, x]]).abs() < 1e-4, "({y}, {x}): {mean} against {}", img[[0, y, x]]);
            }
        }
        assert!(matches!(magnify_image(&img, 1), std::borrow::Cow::Borrowed(_)), "scale 1 copies nothing");
    }

    /// `sam.match_labeled_fraction`: the least-background voxels grow first, into their most
    /// probable foreground class; SAM's confident background and an already large enough label
    /// are left alone.
    #[test]
    fn pseudo_labels_grow_to_the_labelled_fraction() {
        // 10 voxels in a row; background probabilities, and how the rest splits between
        // classes 1 and 2 (class 1 share).
        let bg = [0.2f32, 0.95, 0.6, 0.55, 0.8, 0.92, 0.7, 0.3, 0.99, 0.65];
        let share1 = [0.9f32, 0.5, 0.2, 0.7, 0.5, 0.5, 0.1, 0.5, 0.5, 0.8];
        let probs = Array4::from_shape_fn((3, 1, 1, 10), |(c, _, _, x)| match c {
            0 => bg[x],
            1 => (1.0 - bg[x]) * share1[x],
            _ => (1.0 - bg[x]) * (1.0 - share1[x]),
        });
        let make = || {
            let label = argmax(&probs);
            PseudoLabel { probabilities: probs.clone(), label, confidence: 0.0 }
        };
        let mut p = make();
        // argmax: voxel 0 (class 1) and voxel 7 (classes tie: the first, 1) are foreground.
        assert_eq!(p.label.iter().copied().collect::<Vec<_>>(), [1, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        // 50%: three more, the lowest background probabilities: voxels 3 (0.55), 2 (0.6), 9 (0.65).
        assert_eq!(grow_to_fraction(&mut p, 0.5), 3);
        assert_eq!(p.label.iter().copied().collect::<Vec<_>>(), [1, 0, 2, 1, 0, 0, 0, 1, 0, 1]);
        // 100%: everything below the cap (voxels 6 and 4 too), never the confident background
        // at 0.92, 0.95, 0.99.
        assert_eq!(grow_to_fraction(&mut p, 1.0), 2);
        assert_eq!(p.label.iter().copied().collect::<Vec<_>>(), [1, 0, 2, 1, 1, 0, 2, 1, 0, 1]);
        // Already at or above the fraction: unchanged; probabilities untouched.
        let mut q = make();
        assert_eq!(grow_to_fraction(&mut q, 0.2), 0);
        assert_eq!(grow_to_fraction(&mut q, 0.0), 0);
        assert_eq!(q.label, argmax(&probs));
        assert_eq!(q.probabilities, probs);
    }

    /// `sam.lora_last_blocks` where it cannot apply (here: SAM from random weights) is said.
    #[test]
    fn lora_last_blocks_without_a_pretrained_encoder_is_said() {
        let mut cfg = TrainConfig::test_tiny();
        cfg.sam.checkpoint = None;
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = messages.clone();
        let r = Reporter::detached(Some(Box::new(move |p: &crate::job::Progress| seen.lock().unwrap().push(p.message.clone()))));
        let said = |m: &[String]| m.iter().any(|t| t.contains("sam.lora_last_blocks 1 is ignored") && t.contains("random weights"));
        SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
        assert!(!said(&messages.lock().unwrap()), "said without the option");
        cfg.sam.lora_last_blocks = 1;
        SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
        assert!(said(&messages.lock().unwrap()), "not said: {:?}", messages.lock().unwrap());
    }

    /// `sam.bf16`: fine-tuning and pseudo-labelling run under CPU bfloat16 autocast (the
    /// results differ from float32's, so the path is taken) and stay close to float32's, with
    /// float32 probabilities out.
    #[test]
    fn bf16_fine_tuning_and_pseudo_labels_stay_close_to_float32() {
        let mut cfg = TrainConfig::test_tiny();
        cfg.rot_flip = false;
        let r = Reporter::detached(None);
        let shape = cfg.sam_patch_zyx().unwrap();
        let image = Array3::from_shape_fn(shape, |(z, y, x)| ((z * 7 + y * 3 + x) % 11) as f32 / 5.0 - 1.0);
        let label = Array3::from_shape_fn(shape, |(_, y, x)| u8::from(y > shape[1] / 3 && y < shape[1] / 2 && x > shape[2] / 4));
        let data = [LabeledVolume { image: &image, label: &label }];
        let run = |bf16: bool| {
            let mut cfg = cfg.clone();
            cfg.sam.bf16 = bf16.into();
            tch::manual_seed(5);
            let mut sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
            sam.finetune(&cfg, &data, 3, 7, &r, None).unwrap();
            sam.pseudo_label(&cfg, &image, None).unwrap().probabilities
        };
        let (p32, p16) = (run(false), run(true));
        assert_eq!(p32.shape(), p16.shape());
        assert!(p16.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        let diff = p32.iter().zip(p16.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 0.0, "bf16 gave float32's results exactly: autocast was not on");
        assert!(diff < 0.1, "bf16 moved a probability by {diff}");
    }

    /// `sam.warmup`: linear up to `lr` over its steps, then poly decay over the rest; 0 is the
    /// paper's schedule to the bit.
    #[test]
    fn warmup_then_poly_decay() {
        let mut s = TrainConfig::cpu_small().sam;
        s.lr = 1e-3;
        s.warmup = 0;
        for it in [0, 1, 299, 599] {
            assert_eq!(finetune_lr(&s, it, 600), 1e-3 * (1.0 - it as f64 / 600.0).powf(0.9));
        }
        s.warmup = 100;
        assert!((finetune_lr(&s, 0, 600) - 1e-5).abs() < 1e-12);
        assert!((finetune_lr(&s, 49, 600) - 5e-4).abs() < 1e-12);
        assert_eq!(finetune_lr(&s, 99, 600), 1e-3);
        assert_eq!(finetune_lr(&s, 100, 600), 1e-3);
        assert!((finetune_lr(&s, 350, 600) - 1e-3 * 0.5f64.powf(0.9)).abs() < 1e-12);
        assert!(finetune_lr(&s, 599, 600) > 0.0);
        // A warm-up longer than the run: warm-up only.
        assert!((finetune_lr(&s, 9, 10) - 1e-3).abs() < 1e-12);
    }

    /// `sam.bezier` false: a training sample is a crop of the scan with its own intensities
    /// (without rot_flip, the crop itself); true: the intensity curve changes them.
    #[test]
    fn bezier_off_keeps_the_scans_intensities() {
        let mut cfg = TrainConfig::test_tiny();
        cfg.rot_flip = false;
        let r = Reporter::detached(None);
        let sam = SamModule::new(&cfg, 2, Device::Cpu, &r).unwrap();
        let shape = cfg.sam_patch_zyx().unwrap();
        let image = Array3::from_shape_fn(shape, |(z, y, x)| (z * 7 + y * 3 + x) as f32 / 10.0 - 2.0);
        let label = Array3::<u8>::zeros(shape);
        let data = [LabeledVolume { image: &image, label: &label }];
        for bezier in [false, true] {
            cfg.sam.bezier = bezier;
            let mut rng = Rng::seed_from_u64(3);
            let changed = (0..4).any(|_| sam.random_sample(&cfg, &data, &mut rng).unwrap().0 != image);
            assert_eq!(changed, bezier, "bezier {bezier}");
        }
    }
}
