//! SFR: Stitching, Fine-tuning, Re-training — SAM-enabled semi-supervised 3D medical image
//! segmentation. The layers follow `DESIGN.md`; dependencies point downwards only:
//!
//! ```text
//! ffi        C ABI (the only code that is unsafe towards callers)
//! job        background runner: progress, cancellation, checkpoints
//! pipeline   SFR and SFR+
//! ssl        re-training methods
//! nn         tch models: SAM (+LoRA), V-Net
//! infer      sliding-window inference
//! stitch     3D <-> 2D canvas
//! io         NIfTI, PyTorch checkpoints, dataset folders
//! volume     Volume = ndarray + Geometry
//! metrics    Dice, Jaccard, ASD, HD95
//! threads    libtorch's thread count sized to the free cores (used by the loops above)
//! ```
pub mod error;
pub mod ffi;
pub mod infer;
pub mod io;
pub mod job;
pub mod limits;
pub mod malloc;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod phantom;
pub mod pipeline;
pub mod ssl;
pub mod stitch;
pub mod threads;
pub mod volume;

pub use error::{Error, Result};
pub use volume::{DType, Geometry, Volume};

/// The library version (Cargo.toml's), as reported by `sfr --version` and `sfr_version()`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
