//! File formats: NIfTI volumes, PNG canvases, PyTorch checkpoints, dataset folders. No tch here.
pub mod dataset;
pub mod nifti;
pub mod png;
pub mod pytorch;
