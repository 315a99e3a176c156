//! Every hyperparameter of a training run, in one versioned JSON document (unknown keys are an
//! error), with named presets. Sizes are written as users and DESIGN.md write them: patch
//! `[x, y, z]` (e.g. LA 112×112×80); the code turns them into `[z, y, x]` array order.
use crate::error::{Error, Result};
use crate::infer::Weighting;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

// Each section belongs to the layer that uses it; re-exported so `pipeline::config::X` keeps
// working for the CLI, the tests and older code.
pub use crate::infer::InferenceConfig;
pub use crate::ssl::config::{BnBatches, LrSchedule, Method, OptimizerKind, VNetStage};

pub const CONFIG_VERSION: u32 = 1;

/// `sam.bf16`: JSON `false`, `true` or `"auto"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bf16 {
    #[default]
    Off,
    On,
    /// On where the CPU computes bf16 in hardware (`nn::autocast::cpu_has_bf16`).
    Auto,
}

impl Bf16 {
    /// Whether autocast is on in this process.
    pub fn enabled(self) -> bool {
        match self {
            Bf16::Off => false,
            Bf16::On => true,
            Bf16::Auto => crate::nn::autocast::cpu_has_bf16(),
        }
    }
}

impl From<bool> for Bf16 {
    fn from(on: bool) -> Bf16 {
        if on {
            Bf16::On
        } else {
            Bf16::Off
        }
    }
}

impl Serialize for Bf16 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Bf16::Off => s.serialize_bool(false),
            Bf16::On => s.serialize_bool(true),
            Bf16::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Bf16 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Bf16, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(on) => Ok(on.into()),
            serde_json::Value::String(s) if s == "auto" => Ok(Bf16::Auto),
            other => Err(serde::de::Error::custom(format!("sam.bf16 must be true, false or \"auto\" (got {other})"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamStage {
    /// `vit_b`, `vit_l`, `vit_h` (official SAM), `lite_medsam`, `mobile_sam` (TinyViT), `tiny`
    /// (a small ViT for tests), or `auto`: the checkpoint's own architecture (detected from its
    /// keys and shapes), and `tiny` from scratch when there is no checkpoint.
    pub variant: String,
    /// A checkpoint file (official `sam_vit_b_01ec64.pth`, `lite_medsam.pth`, MobileSAM's, or
    /// our safetensors), the known name `lite-medsam` (the copy scripts/setup.sh keeps in the
    /// cache) or `none`. When null: `$SFR_SAM_CHECKPOINT`, then (variant `auto` or
    /// `lite_medsam`) the cache's LiteMedSAM; otherwise random weights, logged loudly. See
    /// `nn::sam::checkpoint`.
    pub checkpoint: Option<PathBuf>,
    /// Canvas / SAM input size S.
    pub image_size: usize,
    pub lora_rank: usize,
    pub iterations: usize,
    pub lr: f64,
    /// Steps of linear learning-rate warm-up at the start of every fine-tuning (the poly decay
    /// then runs over the steps after it); 0: none, the paper's schedule. Configs written before
    /// the key existed: 0, as they trained.
    #[serde(default)]
    pub warmup: usize,
    pub weight_decay: f64,
    pub batch: usize,
    /// 0: the paper's fine-tuning (LoRA on the encoder, every step encodes its canvases).
    /// N > 0, with a pretrained SAM: the encoder stays frozen (no LoRA unless
    /// `lora_last_blocks`), N augmented canvases are encoded once and the prompt encoder and mask decoder train on their cached
    /// embeddings — on a CPU a step then costs a decoder pass instead of an encoder forward and
    /// backward. Ignored (the paper's way) when SAM starts from random weights.
    #[serde(default)]
    pub frozen_encoder_canvases: usize,
    /// With `frozen_encoder_canvases` N > 0: LoRA (rank `lora_rank`) trains on the encoder's
    /// last K attention blocks. The encoder up to them is frozen and its output is what the N
    /// canvases cache; every step runs the last K blocks and the neck forward and backward. 0:
    /// the whole encoder frozen, only the prompt encoder and mask decoder train. Without a
    /// checkpoint or with N = 0 it does not apply, and the run says so.
    #[serde(default)]
    pub lora_last_blocks: usize,
    /// With a pretrained SAM: start every class's mask token, hypernetwork MLP and IoU row from
    /// the checkpoint's single-mask token (false: heads that do not fit are re-initialised
    /// randomly, SAMed's way).
    #[serde(default)]
    pub class_heads_from_mask_token: bool,
    /// false: the SAM stage stitches patches of the V-Net's size (the paper's LA patch of 80
    /// slices nearly fills its 9×9 grid). true: its patches take as many slices as the canvas
    /// grid holds (`TrainConfig::sam_patch_zyx`), same in-plane size: every cell carries a
    /// native slice instead of padding, and a volume needs fewer pseudo-labelling windows
    /// (cpu-small: 40 slices on the 5×8 grid instead of 32).
    #[serde(default)]
    pub fill_canvas: bool,
    /// In-plane magnification of every slice before stitching: 1 is the paper's native
    /// resolution; k > 1 stitches each slice upsampled k× (bilinear; labels nearest) and brings
    /// SAM's probabilities back to the voxel grid by k×k averaging. Structures then appear at
    /// k× their native size to an encoder pretrained on larger ones, at the cost of k²× fewer
    /// slices per canvas (`TrainConfig::sam_patch_zyx`).
    #[serde(default = "one")]
    pub scale: usize,
    /// The random Bezier intensity curve of the paper's fine-tuning augmentation (Models
    /// Genesis': half of the curves invert the contrast). false: the SAM stage's canvases keep
    /// the scans' own intensities, as pseudo-labelling sees them.
    #[serde(default = "yes")]
    pub bezier: bool,
    /// On the CPU: the SAM stage's encoder passes (LoRA fine-tuning, the frozen encoder's
    /// cache, pseudo-labelling) run under bfloat16 autocast (`nn::autocast`): matrix products and
    /// convolutions in bf16, parameters, gradients and the loss in float32. About 2× faster
    /// on a CPU with AVX512-BF16, its embeddings about 3% off. No effect on CUDA. `true`,
    /// `false`, or `"auto"`: on exactly where the CPU has AVX512-BF16 (without it libtorch
    /// emulates bf16 and gains nothing).
    #[serde(default)]
    pub bf16: Bf16,
    /// Grow each pseudo-label to the labelled cases' foreground fraction: where SAM's
    /// pseudo-label covers less of its volume than the labelled cases' mean foreground
    /// fraction, the background voxels of lowest background probability (below
    /// `MATCH_FRACTION_MAX_BACKGROUND`) become foreground, of their most probable foreground
    /// class, until it does. A SAM fine-tuned on a few cases under-segments (on hippocampus
    /// 34–47% of the true foreground was missed, 12–20% added); the labelled cases, not the
    /// unlabelled ones' labels, say how much foreground to expect. false: the argmax, the
    /// paper's rule, in every preset: on hippocampus the grown pseudo-labels scored 4.6 Dice
    /// points higher but trained a V-Net 1.2 points lower (3 seeds; docs/experiments/notes.md, "Growing the
    /// pseudo-labels").
    #[serde(default)]
    pub match_labeled_fraction: bool,
    /// Every pseudo-label keeps only the largest face-connected piece of its foreground, then
    /// of each class (nnU-Net's "remove all but the largest component"); removed voxels become
    /// background. Applied after `match_labeled_fraction`, whose growth adds scattered voxels.
    /// For structures that are one piece (hippocampus, left atrium).
    #[serde(default)]
    pub largest_component: bool,
    /// The mask decoder's prompt in fine-tuning and pseudo-labelling: `none` (the paper's) or
    /// `canvas_box` (one box around the whole canvas, LiteMedSAM's kind of prompt).
    #[serde(default)]
    pub prompt: crate::nn::sam::SamPrompt,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

impl SamStage {
    /// Names the checkpoint (a file or a known name). A named file decides SAM's architecture:
    /// the variant becomes `auto` (a preset's `tiny` would refuse LiteMedSAM's weights), unless
    /// `keep_variant` (the user chose it) or the name is `none` (random weights).
    pub fn name_checkpoint(&mut self, spec: &Path, keep_variant: bool) {
        self.checkpoint = Some(spec.to_path_buf());
        if !keep_variant && spec.as_os_str() != crate::nn::sam::checkpoint::NONE {
            self.variant = "auto".into();
        }
    }
}

/// `normalization`: how intensities are normalised before the networks see them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizationChoice {
    /// CT where the dataset says its images are CT (dataset.json's `modality` or
    /// `channel_names`), else the per-volume z-score. In-memory datasets (the C ABI, Slicer)
    /// name no modality: they get the z-score unless the config says `ct`.
    #[default]
    Auto,
    /// Each volume by its own mean and standard deviation (MRI and other relative intensities).
    Zscore,
    /// nnU-Net's CT scheme: clip to the labelled foreground's 0.5-99.5th percentiles, then
    /// standardise by the foreground's mean and standard deviation, one window for every scan.
    Ct,
}

impl NormalizationChoice {
    /// `Auto` made definite by the dataset's declared modality (channel 0), if any.
    pub fn resolve(self, modality: Option<&str>) -> NormalizationChoice {
        match self {
            NormalizationChoice::Auto if modality.is_some_and(is_ct_modality) => NormalizationChoice::Ct,
            NormalizationChoice::Auto => NormalizationChoice::Zscore,
            other => other,
        }
    }
}

/// "CT", "ct", "CT scan", "non-contrast CT": a word "CT" (not "CTA"-like words; they are CT too,
/// but not every word containing the letters is, e.g. "SPECT").
pub fn is_ct_modality(m: &str) -> bool {
    m.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w.eq_ignore_ascii_case("ct"))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SfrPlus {
    pub enabled: bool,
    /// Samples with mean max-class probability ≥ tau go back to fine-tune SAM.
    pub tau: f64,
    pub rounds: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub version: u32,
    pub preset: String,
    pub seed: u64,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// Intra-op threads of libtorch; 0 = auto: the cores other work leaves free, re-checked
    /// during the run, at most libtorch's default (see `crate::threads`).
    pub threads: usize,
    pub method: Method,
    /// Use SAM pseudo-labels (the SFR framework); false = the method alone.
    pub sfr: bool,
    /// Patch `[x, y, z]` for V-Net training, inference windows and SAM stitching; with
    /// `patch_budget` > 0 the plan replaces it by one shaped like the data.
    pub patch: [usize; 3],
    /// Voxels one patch may have (the compute of a V-Net step grows with them). > 0: training
    /// plans the patch from the data — the one of at most this many voxels (multiples of 16)
    /// that spans the most of the labelled foreground's median extent along its worst-covered
    /// axis, at least 32 voxels per axis where that fits (`pipeline::plan::plan_grid`) — and the
    /// model records it. 0 (every preset; configs written before the key existed): `patch` as it
    /// is. An override that sets `patch` without `patch_budget` sets the budget to 0: a patch
    /// given is a patch used.
    #[serde(default)]
    pub patch_budget: usize,
    /// Random rot90/flip in the axial plane (UA-MT's RandomRotFlip). Off for structures whose
    /// classes are told apart by their position along an axis (hippocampus head vs body):
    /// mirroring them makes the classes ambiguous.
    pub rot_flip: bool,
    /// Labelled cases held out for validation. `null` (the default) decides by the count:
    /// none when there are at most 8 labelled cases (each one is precious: holding one of 4 out
    /// cost 9 points of Dice on hippocampus), else 10% of them (at least 1). A number asks for
    /// exactly that many; more than half of the labelled cases is an error.
    pub validation_cases: Option<usize>,
    /// Voxel spacing `[x, y, z]` (mm) to train at. `null` (the default): the median spacing of
    /// the training images. Every training volume whose spacing differs (by more than half a
    /// voxel over its extent) is resampled to it — images trilinearly, labels class by class —
    /// and the model records it: segmentation resamples scans to it and the labels back.
    #[serde(default)]
    pub spacing: Option<[f64; 3]>,
    /// The least share of the labelled foreground's median extent that one patch must span
    /// along every axis (`spacing` unset). Where the patch at the median spacing spans less,
    /// training coarsens the spacing — isotropically, to a multiple of 0.05 mm, never finer than
    /// the median on any axis — until it spans that share: a patch sized for a CPU then sees
    /// the structure's context, at the cost of detail (on the left atrium, 4 labelled cases:
    /// Dice 52.7 at the native 0.625 mm, 79.4 at the 1.7 mm this gives; docs/results.md). 0:
    /// the median spacing. Configs written before the key existed get 0.
    #[serde(default)]
    pub patch_context: f64,
    /// Intensity normalisation: `auto` (the default: CT where the dataset declares CT, else the
    /// per-volume z-score), `zscore` or `ct`. The model records what was used, with the CT
    /// window, and segmentation applies the same to every scan. Configs written before the key
    /// existed get `auto`.
    #[serde(default)]
    pub normalization: NormalizationChoice,
    /// Iterations between checkpoints (0 = none).
    pub checkpoint_every: usize,
    pub sam: SamStage,
    pub vnet: VNetStage,
    pub sfr_plus: SfrPlus,
    pub inference: InferenceConfig,
}

impl TrainConfig {
    pub const PRESETS: [&'static str; 4] = ["paper-la", "cpu-small", "cpu-lora", "test-tiny"];

    /// The paper's LA settings (for a GPU): patch 112×112×80, SAM vit_b at 1024, 6000 iterations.
    pub fn paper_la() -> TrainConfig {
        TrainConfig {
            version: CONFIG_VERSION,
            preset: "paper-la".into(),
            seed: 1337,
            device: "auto".into(),
            threads: 0,
            method: Method::MeanTeacher,
            sfr: true,
            patch: [112, 112, 80],
            // The paper's patch, as it is: the GPU path is the paper's recipe.
            patch_budget: 0,
            rot_flip: true,
            validation_cases: None,
            spacing: None,
            patch_context: 0.5,
            normalization: NormalizationChoice::Auto,
            checkpoint_every: 500,
            sam: SamStage {
                variant: "vit_b".into(),
                checkpoint: None,
                image_size: 1024,
                lora_rank: 4,
                iterations: 6000,
                lr: 1e-3,
                warmup: 0,
                weight_decay: 0.1,
                batch: 2,
                frozen_encoder_canvases: 0,
                lora_last_blocks: 0,
                class_heads_from_mask_token: false,
                fill_canvas: false,
                scale: 1,
                bezier: true,
                bf16: Bf16::Off,
                match_labeled_fraction: false,
                largest_component: false,
                prompt: crate::nn::sam::SamPrompt::None,
            },
            vnet: VNetStage {
                n_filters: 16,
                dropout: 0.5,
                head_bias_prior: true,
                iterations: 6000,
                optimizer: OptimizerKind::Sgd,
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 1e-4,
                schedule: LrSchedule::Step { every: 2500, gamma: 0.1 },
                labeled_batch: 2,
                unlabeled_batch: 2,
                pseudo_label_weight: 1.0,
                // On in every preset: with few labels, pseudo-labels that miss a class teach
                // it away (hippocampus, issue 10: anterior Dice 0.0).
                pseudo_label_guard: crate::ssl::config::DEFAULT_PSEUDO_LABEL_GUARD,
                consistency: 0.1,
                rampup_epochs: 40.0,
                iterations_per_epoch: 150,
                ema_decay: 0.99,
                noise_std: 0.1,
                noise_clamp: 0.2,
                acmt_ratio: 0.2,
                // Not UA-MT's joint batch: with BatchNorm statistics shared by labelled and
                // unlabelled crops, a mean teacher with consistency 0 lost 51 points of Dice
                // against supervised on hippocampus (docs/experiments/notes.md, "Mixed batches"); separate batches
                // make it train exactly as supervised. `joint` reproduces the paper's code.
                batchnorm: BnBatches::Separate,
            },
            sfr_plus: SfrPlus { enabled: false, tau: 0.985, rounds: 2 },
            inference: InferenceConfig { stride: [18, 18, 4], weighting: Weighting::Mean, batch: 4 },
        }
    }

    /// A 2-core CPU: the hippocampus data end to end in minutes. The SAM stage uses the
    /// pretrained LiteMedSAM when `./scripts/setup.sh` has cached it (`variant: auto`; else the
    /// `tiny` ViT from scratch, warned) on a 256 canvas (a hippocampus patch of 32×48 slices
    /// gives a 5×8 grid); the V-Net 8 base filters, and far fewer iterations.
    pub fn cpu_small() -> TrainConfig {
        let mut c = TrainConfig::paper_la();
        c.preset = "cpu-small".into();
        c.device = "cpu".into();
        c.patch = [32, 48, 32];
        // The patch as it is, not planned: on the left atrium (4 labelled cases, 3 seeds) the
        // patch the budget plans from the foreground's shape, 48×32×32 (long along its 107 mm),
        // scored 74.9 ± 3.5 at the 1.15 mm it allows and 70.0 ± 1.4 at 1.7 mm, against
        // 79.4 ± 1.1 for this 32×48×32 at 1.7 mm (docs/results.md, "A patch shaped like the
        // structure"). On hippocampus the plan gives 32×48×32 anyway.
        c.patch_budget = 0;
        // Hippocampus head and body are told apart by position: no mirroring (measured on 10
        // held-out cases, 4 labelled, 600 iterations: anterior/posterior Dice 69/40% without,
        // 31/37% with rot/flip).
        c.rot_flip = false;
        c.checkpoint_every = 100;
        // LiteMedSAM's pseudo-labels beat a SAM from scratch by far (demo split, 20 unlabelled
        // cases, Dice anterior/posterior: 69/62 against 23/22; SFR(MT) 80.8 against 47.1;
        // docs/experiments/notes.md, "LiteMedSAM"). Its encoder stays frozen and 48 canvases are encoded once: one
        // encoder forward costs 3–16 s on a 2-core CPU, so the paper's LoRA fine-tuning (forward
        // and backward every step) would take hours; 16 canvases and 300 decoder steps gave
        // 63/55 and SFR(MT) 77.9, below supervised. Every class head starts from the trained
        // single-mask token. Both are ignored for `tiny` from scratch. The canvas is filled
        // (40 slices on the 5×8 grid, not the V-Net's 32): pseudo-labels 71.8/66.2 against
        // 64.9/60.1 on the V-Net's patch (same build, seed and split), and 3.05 instead of 5.4
        // pseudo-labelling windows per demo volume (pseudo-labelling 68 s instead of 129 s).
        c.sam = SamStage {
            variant: "auto".into(),
            image_size: 256,
            iterations: 600,
            frozen_encoder_canvases: 48,
            class_heads_from_mask_token: true,
            fill_canvas: true,
            ..c.sam
        };
        // Adam at 1e-3 instead of the paper's SGD at 0.01: on this CPU's budget SGD had not left
        // the all-background start (demo split, supervised, mean Dice 0.0 at 300 and 600
        // iterations; 32 at lr 0.05; 79 took 2000 iterations), while Adam reached 79.6 in 300
        // and 81.0 in 600 iterations (docs/experiments/notes.md, "A recipe for the CPU"). The ramp-up spans the run.
        // No Dropout3d: at 8 base filters the head sees 8 channels, and dropping half of them at
        // every step starved a minority class (hippocampus, 4 labelled cases, seed 1, with the
        // head at the class prior: anterior/posterior Dice 46.4/75.7 on 60 test cases with
        // dropout 0.5, 82.0/79.3 without; docs/results.md, "A lost class: the root cause").
        c.vnet = VNetStage {
            n_filters: 8,
            dropout: 0.0,
            iterations: 600,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            schedule: LrSchedule::Poly { power: 0.9 },
            iterations_per_epoch: 15,
            ..c.vnet
        };
        c.inference = InferenceConfig { stride: [16, 24, 16], weighting: Weighting::Gaussian, batch: 4 };
        c
    }

    /// `cpu-small` with the paper's fine-tuning: LoRA on every attention block of the pretrained
    /// encoder, fresh augmented canvases every step (no frozen encoder, no cache), one canvas
    /// per step. Its fine-tuning takes about 11 minutes on 2 idle cores instead of about 3, for
    /// pseudo-labels 13 points of Dice better (docs/experiments/notes.md, "LoRA on every encoder block"). With the `tiny` ViT from
    /// scratch (no cached LiteMedSAM) it is `cpu-small` with batches of one.
    pub fn cpu_lora() -> TrainConfig {
        let mut c = TrainConfig::cpu_small();
        c.preset = "cpu-lora".into();
        c.sam.frozen_encoder_canvases = 0;
        c.sam.batch = 1;
        // bf16 halves the LoRA step where the CPU has AVX512-BF16 (`sfr bench`: 0.51 × float32)
        // at no measured cost (pseudo-labels 74.6 against 74.0 in float32, SFR(MT) 81.94 against
        // 81.35, seed 2026); elsewhere float32, since emulated bf16 is no faster.
        c.sam.bf16 = Bf16::Auto;
        c
    }

    /// Seconds, for tests: tiny everything.
    pub fn test_tiny() -> TrainConfig {
        let mut c = TrainConfig::cpu_small();
        c.preset = "test-tiny".into();
        c.patch = [16, 16, 16];
        c.patch_budget = 0;
        c.checkpoint_every = 0;
        // Tests train at the cases' own spacing unless they ask for another.
        c.patch_context = 0.0;
        // `tiny` explicitly: tests must not pick up a cached pretrained SAM.
        // The V-Net's patch on SAM's canvas (a filled 8×8 grid would be 64 slices: slower tests).
        c.sam = SamStage { variant: "tiny".into(), iterations: 10, image_size: 128, batch: 1, fill_canvas: false, ..c.sam };
        // The paper's SGD: the step-parity tests check our loop against the PyTorch reference's
        // `torch.optim.SGD` on this preset (Adam is checked against libtorch's in retrain.rs).
        // The reference's dropout too, so that the parity tests exercise it.
        c.vnet = VNetStage { n_filters: 4, dropout: 0.5, iterations: 20, iterations_per_epoch: 2, optimizer: OptimizerKind::Sgd, lr: 0.01, ..c.vnet };
        c.inference = InferenceConfig { stride: [8, 8, 8], weighting: Weighting::Gaussian, batch: 2 };
        c
    }

    pub fn preset(name: &str) -> Result<TrainConfig> {
        match name {
            "paper-la" => Ok(TrainConfig::paper_la()),
            "cpu-small" => Ok(TrainConfig::cpu_small()),
            "cpu-lora" => Ok(TrainConfig::cpu_lora()),
            "test-tiny" => Ok(TrainConfig::test_tiny()),
            other => Err(Error::invalid(format!("unknown preset '{other}' (known: {})", TrainConfig::PRESETS.join(", ")))),
        }
    }

    /// Parses a full config document: unknown keys, missing keys or a wrong version are errors.
    pub fn from_json(text: &str) -> Result<TrainConfig> {
        let c: TrainConfig = serde_json::from_str(text).map_err(|e| Error::invalid(format!("config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// A preset with some keys overridden by a partial JSON object (`{"vnet": {"iterations":
    /// 100}}`): the merge is by key, and the result is re-parsed strictly, so a misspelt key
    /// is still an error.
    pub fn preset_with_overrides(preset: &str, overrides: &str) -> Result<TrainConfig> {
        TrainConfig::preset(preset)?.with_overrides(overrides)
    }

    /// This config with some keys overridden by a partial JSON object (strict, as above).
    pub fn with_overrides(&self, overrides: &str) -> Result<TrainConfig> {
        self.with_override_value(parse_overrides(overrides)?)
    }

    /// [`with_overrides`](Self::with_overrides) for JSON already parsed (by
    /// [`parse_overrides`]), for a caller that also reads which keys it sets.
    pub fn with_override_value(&self, mut over: serde_json::Value) -> Result<TrainConfig> {
        // A patch given is a patch used: the plan does not reshape it.
        if let Some(o) = over.as_object_mut().filter(|o| o.contains_key("patch") && !o.contains_key("patch_budget")) {
            o.insert("patch_budget".into(), 0.into());
        }
        let base = serde_json::to_value(self).expect("serialisable");
        let merged = merge(base, over);
        let c: TrainConfig = serde_json::from_value(merged).map_err(|e| Error::invalid(format!("config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The JSON that crosses the C ABI and the Slicer module: either a full config (it has
    /// `"version"`), or `{"preset": NAME, ...overrides}` (preset default `cpu-small`), merged
    /// and parsed strictly.
    pub fn from_user_json(text: &str) -> Result<TrainConfig> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("config: not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::invalid("config: expected a JSON object"))?;
        if obj.contains_key("version") {
            return TrainConfig::from_json(text);
        }
        let preset = match obj.get("preset") {
            None => "cpu-small",
            Some(p) => p.as_str().ok_or_else(|| Error::invalid("config: \"preset\" must be a string"))?,
        };
        TrainConfig::preset_with_overrides(preset, text)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialisable")
    }

    /// Patch in array order [z, y, x].
    pub fn patch_zyx(&self) -> [usize; 3] {
        [self.patch[2], self.patch[1], self.patch[0]]
    }
    /// The SAM stage's patch in array order [z, y, x]: the V-Net's, or with `sam.fill_canvas`
    /// as many slices as the canvas grid for its in-plane size holds (more or fewer than the
    /// V-Net's; with `sam.scale` k the slices count as k× larger). Errors when a slice does not
    /// fit the canvas.
    pub fn sam_patch_zyx(&self) -> Result<[usize; 3]> {
        let [d, h, w] = self.patch_zyx();
        if !self.sam.fill_canvas {
            return Ok([d, h, w]);
        }
        let k = self.sam.scale;
        Ok([crate::stitch::StitchLayout::max_slices(h * k, w * k, self.sam.image_size)?, h, w])
    }

    /// The SAM stage's patch as stitched: `sam_patch_zyx` with every slice magnified `sam.scale`×.
    pub fn sam_canvas_patch_zyx(&self) -> Result<[usize; 3]> {
        let [d, h, w] = self.sam_patch_zyx()?;
        Ok([d, h * self.sam.scale, w * self.sam.scale])
    }
    pub fn stride_zyx(&self) -> [usize; 3] {
        let s = self.inference.stride;
        [s[2], s[1], s[0]]
    }

    /// Checks every value against the bounds of [`crate::limits`] before any work starts (the
    /// CLI, the C ABI and the Slicer module all come through here), so that a bad value is a
    /// clear error at once, never a crash, an abort on a huge allocation or a failure after
    /// the SAM stage has run for an hour.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{self as lim, check_batch, check_non_negative, check_positive, check_range};
        if self.version != CONFIG_VERSION {
            return Err(Error::invalid(format!("config version {} is not supported (this library reads version {CONFIG_VERSION})", self.version)));
        }
        let err = |e: Error| Error::invalid(format!("config: {}", e.to_string().trim_start_matches("config: ")));
        let run = || -> Result<()> {
            crate::nn::parse_device_name(&self.device)?;
            if self.threads != 0 {
                check_range("threads", self.threads, 1, lim::MAX_THREADS)?;
            }
            lim::check_patch("patch", self.patch)?;
            if self.patch_budget != 0 && !(16 * 16 * 16..=lim::MAX_PATCH_VOXELS).contains(&self.patch_budget) {
                return Err(Error::invalid(format!(
                    "patch_budget {} must be 0 (the patch as given) or {}..={} voxels",
                    self.patch_budget,
                    16 * 16 * 16,
                    lim::MAX_PATCH_VOXELS
                )));
            }
            if let Some(sp) = self.spacing {
                for (a, &v) in sp.iter().enumerate() {
                    check_positive(&format!("spacing[{a}]"), v)?;
                }
            }
            if !(0.0..=1.0).contains(&self.patch_context) {
                return Err(Error::invalid(format!("patch_context {} must be in 0..=1 (a share of the foreground's extent; 0: the median spacing)", self.patch_context)));
            }
            let patch_voxels = self.patch.iter().product::<usize>();
            if self.inference.stride.contains(&0) || self.inference.stride.iter().zip(&self.patch).any(|(s, p)| s > p) {
                return Err(Error::invalid(format!("inference stride {:?} must be in 1..=patch {:?}", self.inference.stride, self.patch)));
            }
            check_batch("inference.batch", self.inference.batch, patch_voxels)?;

            let v = &self.vnet;
            check_range("vnet.n_filters", v.n_filters, 1, lim::MAX_N_FILTERS)?;
            check_range("vnet.iterations", v.iterations, 1, lim::MAX_ITERATIONS)?;
            check_range("vnet.iterations_per_epoch", v.iterations_per_epoch, 1, lim::MAX_ITERATIONS)?;
            check_positive("vnet.lr", v.lr)?;
            if !(0.0..1.0).contains(&v.dropout) {
                return Err(Error::invalid(format!("vnet.dropout = {} must be in [0, 1)", v.dropout)));
            }
            if !(0.0..1.0).contains(&v.momentum) {
                return Err(Error::invalid(format!("vnet.momentum = {} must be in [0, 1)", v.momentum)));
            }
            check_non_negative("vnet.weight_decay", v.weight_decay)?;
            match v.schedule {
                LrSchedule::Step { every, gamma } => {
                    check_range("vnet.schedule.every", every, 1, lim::MAX_ITERATIONS)?;
                    check_positive("vnet.schedule.gamma", gamma)?;
                }
                LrSchedule::Poly { power } => check_non_negative("vnet.schedule.power", power)?,
            }
            check_range("vnet.labeled_batch", v.labeled_batch, 1, lim::MAX_BATCH)?;
            check_range("vnet.unlabeled_batch", v.unlabeled_batch, 0, lim::MAX_BATCH)?;
            check_batch("vnet.labeled_batch + vnet.unlabeled_batch", v.labeled_batch + v.unlabeled_batch, patch_voxels)?;
            check_non_negative("vnet.pseudo_label_weight", v.pseudo_label_weight)?;
            // A factor below 1 would refuse pseudo-labels as good as the labelled cases.
            if !(v.pseudo_label_guard == 0.0 || (v.pseudo_label_guard >= 1.0 && v.pseudo_label_guard.is_finite())) {
                return Err(Error::invalid(format!("vnet.pseudo_label_guard = {} must be 0 (off) or a finite factor ≥ 1", v.pseudo_label_guard)));
            }
            check_non_negative("vnet.consistency", v.consistency)?;
            check_non_negative("vnet.rampup_epochs", v.rampup_epochs)?;
            if !(0.0..1.0).contains(&v.ema_decay) || !(0.0..=1.0).contains(&v.acmt_ratio) {
                return Err(Error::invalid("vnet.ema_decay must be in [0, 1) and acmt_ratio in [0, 1]"));
            }
            check_non_negative("vnet.noise_std", v.noise_std)?;
            check_non_negative("vnet.noise_clamp", v.noise_clamp)?;

            let s = &self.sam;
            if s.variant != "auto" {
                crate::nn::sam::SamConfig::from_name(&s.variant).map_err(|e| Error::invalid(format!("sam.variant: {e} or auto")))?;
            }
            if s.image_size % 16 != 0 || !(lim::MIN_SAM_IMAGE_SIZE..=lim::MAX_CANVAS).contains(&s.image_size) {
                return Err(Error::invalid(format!(
                    "sam.image_size {} must be a multiple of 16 in {}..={}",
                    s.image_size,
                    lim::MIN_SAM_IMAGE_SIZE,
                    lim::MAX_CANVAS
                )));
            }
            check_range("sam.lora_rank", s.lora_rank, 1, lim::MAX_LORA_RANK)?;
            check_range("sam.scale", s.scale, 1, lim::MAX_SAM_SCALE)?;
            // The encoder's block count is known once SAM is built (SamModule::new checks it).
            check_range("sam.lora_last_blocks", s.lora_last_blocks, 0, lim::MAX_SAM_ATTENTION_BLOCKS)?;
            check_range("sam.iterations", s.iterations, if self.sfr { 1 } else { 0 }, lim::MAX_ITERATIONS)?;
            check_positive("sam.lr", s.lr)?;
            check_non_negative("sam.weight_decay", s.weight_decay)?;
            check_batch("sam.batch", s.batch, s.image_size * s.image_size)?;
            if self.sfr {
                // The patch must fit the canvas: found now, not after loading every case.
                let stitch_err = |e: Error| Error::invalid(format!("the patch {:?} cannot be stitched at sam.image_size {} (sam.scale {}): {e}", self.patch, s.image_size, s.scale));
                crate::stitch::StitchLayout::for_shape(&self.sam_canvas_patch_zyx().map_err(stitch_err)?, s.image_size).map_err(stitch_err)?;
                if let Some(ck) = s.checkpoint.as_ref().filter(|c| !matches!(c.to_str(), Some(crate::nn::sam::checkpoint::LITE_MEDSAM | crate::nn::sam::checkpoint::NONE))) {
                    if !ck.is_file() {
                        return Err(Error::invalid(format!("sam.checkpoint {} does not exist or is not a file", ck.display())));
                    }
                }
            }
            if !(0.0..=1.0).contains(&self.sfr_plus.tau) {
                return Err(Error::invalid("sfr_plus.tau must be in [0, 1]"));
            }
            check_range("sfr_plus.rounds", self.sfr_plus.rounds, 1, lim::MAX_SFR_PLUS_ROUNDS)?;
            check_range("checkpoint_every", self.checkpoint_every, 0, lim::MAX_ITERATIONS)?;
            Ok(())
        };
        run().map_err(err)
    }
}

/// Parses `--set`-style override JSON, with the error every config error has.
pub fn parse_overrides(overrides: &str) -> Result<serde_json::Value> {
    serde_json::from_str(overrides).map_err(|e| Error::invalid(format!("config: {e}")))
}

fn merge(base: serde_json::Value, over: serde_json::Value) -> serde_json::Value {
    match (base, over) {
        (serde_json::Value::Object(mut b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(bv) => merge(bv, v),
                    None => v, // unknown key: kept, so that strict parsing reports it
                };
                b.insert(k, merged);
            }
            serde_json::Value::Object(b)
        }
        (_, o) => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sam.bf16` reads `true`, `false` and `"auto"`, writes them back the same, and names the
    /// key when given anything else.
    #[test]
    fn bf16_reads_true_false_and_auto() {
        for (json, want) in [("true", Bf16::On), ("false", Bf16::Off), ("\"auto\"", Bf16::Auto)] {
            let c = TrainConfig::preset_with_overrides("cpu-small", &format!(r#"{{"sam": {{"bf16": {json}}}}}"#)).unwrap();
            assert_eq!(c.sam.bf16, want, "{json}");
            assert_eq!(TrainConfig::from_json(&c.to_json()).unwrap(), c);
            let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
            assert_eq!(v["sam"]["bf16"].to_string(), json);
        }
        assert!(Bf16::On.enabled() && !Bf16::Off.enabled());
        assert_eq!(Bf16::Auto.enabled(), crate::nn::autocast::cpu_has_bf16());
        for bad in ["\"yes\"", "1", "null"] {
            let e = TrainConfig::preset_with_overrides("cpu-small", &format!(r#"{{"sam": {{"bf16": {bad}}}}}"#)).unwrap_err().to_string();
            assert!(e.contains("sam.bf16") && e.contains("auto"), "{bad}: {e}");
        }
    }

    #[test]
    fn presets_round_trip_and_validate() {
        for p in TrainConfig::PRESETS {
            let c = TrainConfig::preset(p).unwrap();
            c.validate().unwrap();
            assert_eq!(TrainConfig::from_json(&c.to_json()).unwrap(), c);
        }
        let la = TrainConfig::paper_la();
        assert_eq!(la.patch, [112, 112, 80]);
        assert_eq!(la.patch_zyx(), [80, 112, 112]);
        assert_eq!(la.sam.image_size, 1024);
        assert_eq!(la.sam.variant, "vit_b");
        let small = TrainConfig::cpu_small();
        assert_eq!((small.sam.variant.as_str(), small.sam.image_size, small.sam.frozen_encoder_canvases), ("auto", 256, 48));
        assert_eq!(la.sam.frozen_encoder_canvases, 0, "paper-la: the paper's LoRA fine-tuning");
        let lora = TrainConfig::cpu_lora();
        assert_eq!((lora.sam.frozen_encoder_canvases, lora.sam.batch, lora.sam.lora_last_blocks), (0, 1, 0), "cpu-lora: LoRA on every block");
        assert_eq!(TrainConfig { preset: "cpu-small".into(), sam: small.sam.clone(), ..lora }, small, "cpu-lora is cpu-small but for the SAM stage");
        assert_eq!((lora.sam.bf16, small.sam.bf16, la.sam.bf16), (Bf16::Auto, Bf16::Off, Bf16::Off));
        // Configs written before these keys existed still parse.
        let mut old: serde_json::Value = serde_json::from_str(&la.to_json()).unwrap();
        old["sam"].as_object_mut().unwrap().remove("frozen_encoder_canvases");
        old["sam"].as_object_mut().unwrap().remove("class_heads_from_mask_token");
        old["sam"].as_object_mut().unwrap().remove("fill_canvas");
        old["sam"].as_object_mut().unwrap().remove("scale");
        old["sam"].as_object_mut().unwrap().remove("warmup");
        old["sam"].as_object_mut().unwrap().remove("prompt");
        old["vnet"].as_object_mut().unwrap().remove("pseudo_label_guard");
        assert_eq!(TrainConfig::from_json(&old.to_string()).unwrap(), la);
        assert_eq!(TrainConfig::test_tiny().sam.variant, "tiny");
        let e = TrainConfig::preset_with_overrides("cpu-small", r#"{"sam": {"variant": "vit_q"}}"#).unwrap_err().to_string();
        assert!(e.contains("sam.variant") && e.contains("vit_q"), "{e}");
        let c = TrainConfig::preset_with_overrides("cpu-small", r#"{"sam": {"prompt": "canvas_box"}}"#).unwrap();
        assert_eq!((c.sam.prompt, small.sam.prompt), (crate::nn::sam::SamPrompt::CanvasBox, crate::nn::sam::SamPrompt::None));
        let e = TrainConfig::preset_with_overrides("cpu-small", r#"{"sam": {"prompt": "points"}}"#).unwrap_err().to_string();
        assert!(e.contains("sam.prompt") || e.contains("canvas_box"), "{e}");
        let c = TrainConfig::preset_with_overrides("cpu-small", r#"{"sam": {"variant": "lite_medsam", "checkpoint": "lite-medsam"}}"#).unwrap();
        assert_eq!(c.sam.checkpoint.as_deref(), Some(std::path::Path::new("lite-medsam")));
        assert_eq!(la.vnet.iterations, 6000);
        for p in TrainConfig::PRESETS {
            assert_eq!(TrainConfig::preset(p).unwrap().vnet.pseudo_label_guard, 4.0, "{p}: the pseudo-label guard is on");
        }
        let off = TrainConfig::preset_with_overrides("cpu-small", r#"{"vnet": {"pseudo_label_guard": 0}}"#).unwrap();
        assert_eq!(off.vnet.pseudo_label_guard, 0.0);
        for bad in ["0.5", "-1"] {
            let e = TrainConfig::preset_with_overrides("cpu-small", &format!(r#"{{"vnet": {{"pseudo_label_guard": {bad}}}}}"#)).unwrap_err().to_string();
            assert!(e.contains("vnet.pseudo_label_guard"), "{e}");
        }
        // patch_context: 0.5 in the presets trained on real data, 0 in test-tiny and in configs
        // written before the key existed (they trained at the median spacing); 0..=1.
        assert_eq!([la.patch_context, small.patch_context, lora.patch_context, TrainConfig::test_tiny().patch_context], [0.5, 0.5, 0.5, 0.0]);
        let mut old: serde_json::Value = serde_json::from_str(&small.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("patch_context");
        assert_eq!(TrainConfig::from_json(&old.to_string()).unwrap().patch_context, 0.0);
        for bad in ["1.5", "-0.1"] {
            let e = TrainConfig::preset_with_overrides("cpu-small", &format!(r#"{{"patch_context": {bad}}}"#)).unwrap_err().to_string();
            assert!(e.contains("patch_context"), "{e}");
        }
        // patch_budget: every preset and configs written before the key use their patch as it
        // is. An override that gives a patch fixes it; one that also gives a budget plans.
        assert_eq!([la.patch_budget, small.patch_budget, lora.patch_budget, TrainConfig::test_tiny().patch_budget], [0, 0, 0, 0]);
        let mut old: serde_json::Value = serde_json::from_str(&small.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("patch_budget");
        assert_eq!(TrainConfig::from_json(&old.to_string()).unwrap().patch_budget, 0);
        let fixed = TrainConfig::preset_with_overrides("cpu-small", r#"{"patch": [48, 32, 32]}"#).unwrap();
        assert_eq!((fixed.patch, fixed.patch_budget), ([48, 32, 32], 0));
        let both = TrainConfig::preset_with_overrides("cpu-small", r#"{"patch": [48, 32, 32], "patch_budget": 65536}"#).unwrap();
        assert_eq!(both.patch_budget, 65536);
        assert_eq!(TrainConfig::preset_with_overrides("cpu-small", r#"{"patch_budget": 49152, "vnet": {"iterations": 5}}"#).unwrap().patch_budget, 49152);
        for bad in ["100", "16777217"] {
            let e = TrainConfig::preset_with_overrides("cpu-small", &format!(r#"{{"patch_budget": {bad}}}"#)).unwrap_err().to_string();
            assert!(e.contains("patch_budget"), "{e}");
        }
        // normalization: auto by default and in configs written before the key; auto becomes
        // CT only where the modality is a word "CT".
        let mut old: serde_json::Value = serde_json::from_str(&small.to_json()).unwrap();
        old.as_object_mut().unwrap().remove("normalization");
        assert_eq!(TrainConfig::from_json(&old.to_string()).unwrap().normalization, NormalizationChoice::Auto);
        let ct = TrainConfig::preset_with_overrides("cpu-small", r#"{"normalization": "ct"}"#).unwrap();
        assert_eq!(ct.normalization, NormalizationChoice::Ct);
        assert!(TrainConfig::preset_with_overrides("cpu-small", r#"{"normalization": "minmax"}"#).is_err());
        for (m, want) in [(Some("CT"), true), (Some("non-contrast ct"), true), (Some("MRI"), false), (Some("SPECT"), false), (Some("LGE-MRI"), false), (None, false)] {
            let got = NormalizationChoice::Auto.resolve(m);
            assert_eq!(got == NormalizationChoice::Ct, want, "{m:?}");
            assert_eq!(NormalizationChoice::Zscore.resolve(m), NormalizationChoice::Zscore);
        }
    }

    #[test]
    fn sam_patch_fills_the_canvas_grid_only_when_asked() {
        let small = TrainConfig::cpu_small();
        // 48×32 slices: 5 rows × 8 columns on 256², so 40 slices instead of the V-Net's 32.
        assert_eq!(small.patch_zyx(), [32, 48, 32]);
        assert_eq!(small.sam_patch_zyx().unwrap(), [40, 48, 32]);
        let la = TrainConfig::paper_la();
        assert_eq!(la.sam_patch_zyx().unwrap(), la.patch_zyx(), "paper-la stitches the V-Net's patch");
        let mut filled = la.clone();
        filled.sam.fill_canvas = true;
        assert_eq!(filled.sam_patch_zyx().unwrap(), [81, 112, 112], "112² slices: a 9×9 grid on 1024²");
        // The grid decides the depth, also when it holds fewer slices than the V-Net's patch.
        let mut deep = small.clone();
        deep.patch = [32, 48, 64];
        assert_eq!(deep.sam_patch_zyx().unwrap(), [40, 48, 32]);
        // Magnified 2×: 96×64 cells, a 2×4 grid, so 8 native slices.
        let mut scaled = small.clone();
        scaled.sam.scale = 2;
        assert_eq!(scaled.sam_patch_zyx().unwrap(), [8, 48, 32]);
        scaled.validate().unwrap();
        assert_eq!(scaled.sam_canvas_patch_zyx().unwrap(), [8, 96, 64]);
        scaled.sam.scale = 6;
        assert!(scaled.sam_patch_zyx().is_err(), "288-pixel slices do not fit a 256² canvas");
        let mut wide = small;
        wide.sam.image_size = 32;
        assert!(wide.sam_patch_zyx().is_err(), "48-pixel slices do not fit a 32² canvas");
    }

    #[test]
    fn unknown_keys_and_versions_are_errors() {
        let e = TrainConfig::preset_with_overrides("cpu-small", r#"{"vnet": {"iterationz": 5}}"#).unwrap_err().to_string();
        assert!(e.contains("iterationz"), "{e}");
        let e = TrainConfig::preset_with_overrides("cpu-small", r#"{"version": 7}"#).unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
        let c = TrainConfig::preset_with_overrides("cpu-small", r#"{"vnet": {"iterations": 5}, "method": "acmt"}"#).unwrap();
        assert_eq!(c.vnet.iterations, 5);
        assert_eq!(c.method, Method::Acmt);
        assert_eq!(c.vnet.lr, 1e-3);
        assert_eq!(c.vnet.optimizer, OptimizerKind::Adam);
        assert!(TrainConfig::from_json("{}").is_err());
        assert!(TrainConfig::preset("nope").is_err());
        assert!(TrainConfig::preset_with_overrides("cpu-small", r#"{"patch": [30, 48, 32]}"#).is_err());
        let u = TrainConfig::from_user_json(r#"{"preset": "test-tiny", "method": "acmt"}"#).unwrap();
        assert_eq!((u.preset.as_str(), u.method), ("test-tiny", Method::Acmt));
        assert_eq!(TrainConfig::from_user_json("{}").unwrap(), TrainConfig::cpu_small());
        assert!(TrainConfig::from_user_json(r#"{"methd": "acmt"}"#).unwrap_err().to_string().contains("methd"));
        assert!(TrainConfig::from_user_json("[1]").is_err());
        let full = TrainConfig::paper_la().to_json();
        assert_eq!(TrainConfig::from_user_json(&full).unwrap(), TrainConfig::paper_la());
    }
}
