//! tch models: SAM (image encoder, prompt encoder, mask decoder) with LoRA, and the V-Net.
//! Models know nothing of files beyond `weights` (tensors in, tensors out).
pub mod lora;
pub mod loss;
pub mod sam;
pub mod vnet;
pub mod weights;

use crate::error::{Error, Result};
use tch::Device;

/// `--device cpu|cuda|auto` as used by every command that runs a model.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::invalid("--device cuda: no CUDA device is available"))
            }
        }
        "auto" => Ok(Device::cuda_if_available()),
        other => Err(Error::invalid(format!("unknown device '{other}' (expected cpu, cuda or auto)"))),
    }
}

/// Checks a device name without requiring the device (configs are validated anywhere).
pub fn parse_device_name(s: &str) -> Result<()> {
    match s {
        "cpu" | "cuda" | "auto" => Ok(()),
        other => Err(Error::invalid(format!("unknown device '{other}' (expected cpu, cuda or auto)"))),
    }
}
