//! tch models: SAM (image encoder, prompt encoder, mask decoder) with LoRA, and the V-Net.
//! Models know nothing of files beyond `weights` (tensors in, tensors out).
pub mod autocast;
pub mod layers;
pub mod lora;
pub mod loss;
pub mod sam;
pub mod vnet;
pub mod weights;

use crate::error::{Error, Result};
use tch::Device;

/// `--device cpu|cuda|auto` as used by every command that runs a model. "auto" is CUDA when a
/// device is available, else the CPU; "cuda" without one is an error saying why.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                let why = if loaded_library("libtorch_cuda.so").is_some() {
                    "libtorch_cuda is loaded, but CUDA finds no GPU or no NVIDIA driver"
                } else {
                    "this build does not link libtorch_cuda (a CPU-only libtorch, or built with SFR_LINK_CUDA=0)"
                };
                Err(Error::invalid(format!("device \"cuda\": no CUDA device is available ({why}); use \"cpu\" or \"auto\"")))
            }
        }
        "auto" => Ok(Device::cuda_if_available()),
        other => Err(Error::invalid(format!("unknown device '{other}' (expected cpu, cuda or auto)"))),
    }
}

/// "cpu", "cuda:0", ...: how logs, model metadata and `device_info` name a device.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The path of a loaded shared library whose file name is `name` (e.g. "libtorch_cuda.so"),
/// from the dynamic loader's own list: what this process really uses, not what was built.
pub fn loaded_library(name: &str) -> Option<std::path::PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CStr;
        use std::os::raw::{c_int, c_void};
        unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: libc::size_t, data: *mut c_void) -> c_int {
            let names = &mut *(data as *mut Vec<std::path::PathBuf>);
            let p = (*info).dlpi_name;
            if !p.is_null() {
                let s = CStr::from_ptr(p).to_string_lossy();
                if !s.is_empty() {
                    names.push(s.into_owned().into());
                }
            }
            0
        }
        let mut names: Vec<std::path::PathBuf> = vec![];
        unsafe { libc::dl_iterate_phdr(Some(each), &mut names as *mut _ as *mut c_void) };
        names.into_iter().find(|p| p.file_name().is_some_and(|f| f == name))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        None
    }
}

/// What this process can compute on, as JSON (`sfr info --devices`, `sfr_device_info`):
/// the libtorch folder in use, whether libtorch_cuda is loaded, CUDA/cuDNN availability, the
/// number of CUDA devices and the device "auto" picks.
pub fn device_info() -> serde_json::Value {
    let torch = loaded_library("libtorch_cpu.so").and_then(|p| p.parent().map(|d| d.display().to_string()));
    let cuda_linked = loaded_library("libtorch_cuda.so").is_some();
    let cuda = tch::Cuda::is_available();
    serde_json::json!({
        "library_version": crate::VERSION,
        "libtorch_dir": torch,
        "cuda_linked": cuda_linked,
        "cuda_available": cuda,
        "cuda_device_count": if cuda { tch::Cuda::device_count() } else { 0 },
        "cudnn_available": cuda && tch::Cuda::cudnn_is_available(),
        "auto": device_name(Device::cuda_if_available()),
    })
}

/// Checks a device name without requiring the device (configs are validated anywhere).
pub fn parse_device_name(s: &str) -> Result<()> {
    match s {
        "cpu" | "cuda" | "auto" => Ok(()),
        other => Err(Error::invalid(format!("unknown device '{other}' (expected cpu, cuda or auto)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_info_reports_what_is_loaded() {
        let info = device_info();
        // libtorch_cpu is always loaded (this test runs tch), from the folder the loader chose.
        let dir = info["libtorch_dir"].as_str().expect("libtorch_dir");
        assert!(std::path::Path::new(dir).join("libtorch_cpu.so").exists(), "{dir}");
        // build.rs links libtorch_cuda exactly when that folder has it (unless SFR_LINK_CUDA=0).
        let has_cuda = std::path::Path::new(dir).join("libtorch_cuda.so").exists();
        if std::env::var("SFR_LINK_CUDA").as_deref() != Ok("0") {
            assert_eq!(info["cuda_linked"], has_cuda, "{info}");
        }
        let cuda = tch::Cuda::is_available();
        assert_eq!(info["cuda_available"], cuda);
        assert_eq!(info["auto"], if cuda { "cuda:0" } else { "cpu" });
    }

    #[test]
    fn cuda_without_a_device_is_a_clear_error() {
        if tch::Cuda::is_available() {
            assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
            return;
        }
        let e = parse_device("cuda").unwrap_err().to_string();
        assert!(e.contains("no CUDA device is available") && e.contains("libtorch_cuda") && e.contains("\"cpu\""), "{e}");
        assert_eq!(parse_device("auto").unwrap(), Device::Cpu);
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }
}
