//! The re-training section of a training run's config (`"method"` and `"vnet"` in its JSON):
//! which SSL method, and the V-Net stage's hyperparameters. `pipeline::config::TrainConfig`
//! assembles it with the other sections and validates it; the serde names are the JSON's.
use serde::{Deserialize, Serialize};

/// The re-training method (the paper's SSL module), orthogonal to `sfr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Labelled data only (with `sfr`: labels + SAM pseudo-labels).
    Supervised,
    /// Teacher trained first, its pseudo-labels then train the student (one round per half).
    SelfTraining,
    /// EMA teacher, softmax-MSE consistency under input noise.
    MeanTeacher,
    /// Mean teacher whose consistency acts only on the most ambiguous voxels.
    Acmt,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::SelfTraining => "self-training",
            Method::MeanTeacher => "mean-teacher",
            Method::Acmt => "acmt",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnBatches {
    Joint,
    Separate,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum LrSchedule {
    /// lr × gamma every `every` iterations (the LA recipe: 0.1 every 2500).
    Step { every: usize, gamma: f64 },
    /// lr × (1 - it/max)^power.
    Poly { power: f64 },
}

/// The V-Net's optimiser (`pipeline::retrain::Optimizer`, PyTorch's formulations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with `momentum` (the paper's and UA-MT's).
    #[default]
    Sgd,
    /// Adam (β 0.9/0.999, ε 1e-8; `momentum` unused).
    Adam,
}

/// The pseudo-label guard's factor in every preset (`pipeline::guard`): a pseudo-label's class
/// fraction may be down to 1/4 of the smallest and up to 4× the largest of the labelled cases.
pub const DEFAULT_PSEUDO_LABEL_GUARD: f64 = 4.0;

fn default_dropout() -> f64 {
    0.5
}

fn default_pseudo_label_guard() -> f64 {
    DEFAULT_PSEUDO_LABEL_GUARD
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VNetStage {
    pub n_filters: i64,
    /// Dropout3d probability at the bottleneck and before the head during training (0: none).
    /// Configs written before the key existed trained with the reference's 0.5.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Start the head's bias at the log of each class's voxel fraction in the labelled cases
    /// (RetinaNet's prior initialisation): every voxel starts as background with each class at
    /// its prior, instead of one class predicted everywhere by the random head. See
    /// `pipeline::retrain::class_prior`. Configs written before the key existed: false, as they trained.
    #[serde(default)]
    pub head_bias_prior: bool,
    pub iterations: usize,
    /// Absent in configs written before it existed: SGD, as they trained.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: LrSchedule,
    pub labeled_batch: usize,
    pub unlabeled_batch: usize,
    /// Weight of the SAM pseudo-label term (SFR).
    pub pseudo_label_weight: f64,
    /// The pseudo-label guard's factor F (`pipeline::guard`): a SAM pseudo-label in which some
    /// class's voxel fraction is below 1/F of the smallest or above F× the largest fraction of
    /// the labelled cases (a class missing, or swallowing others) does not train the V-Net.
    /// 0 switches the guard off; otherwise at least 1. Configs written before the key existed
    /// get the presets' [`DEFAULT_PSEUDO_LABEL_GUARD`].
    #[serde(default = "default_pseudo_label_guard")]
    pub pseudo_label_guard: f64,
    /// Maximum weight of the method's consistency term, ramped as 0.1·exp(-5(1-t)²).
    pub consistency: f64,
    /// Ramp-up length in "epochs" of `iterations_per_epoch` iterations.
    pub rampup_epochs: f64,
    pub iterations_per_epoch: usize,
    pub ema_decay: f64,
    /// Std and clamp of the teacher's input noise (mean teacher, ACMT).
    pub noise_std: f64,
    pub noise_clamp: f64,
    /// Fraction of voxels ACMT treats as ambiguous.
    pub acmt_ratio: f64,
    /// BatchNorm batches of the student: `separate` (the default: two forwards, the labelled
    /// crops normalised by labelled statistics only, the unlabelled by their own, as the
    /// teacher's already are) or `joint` (UA-MT's code: labelled and unlabelled crops in one
    /// forward, so BatchNorm statistics mix them). See docs/experiments/notes.md, "Mixed batches".
    pub batchnorm: BnBatches,
}
