//! SFR and SFR+: stitch -> fine-tune SAM -> pseudo-label -> re-train a V-Net semi-supervised.
pub mod config;
pub mod data;
pub mod retrain;
pub mod sam_stage;
