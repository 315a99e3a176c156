//! Models (`.sfrmodel` files) and synchronous segmentation.
use crate::pipeline::class_check::ClassCheck;
use super::registry::{self, HandleKind};
use super::view::{read_view, sfr_dtype_raw, SegmentationBuffers};
use super::boundary::{c_path, c_str, guard, guard_void, sfr_status, FfiError};
use crate::job::Reporter;
use crate::model::SfrModel;
use crate::volume::Volume;
use ndarray::Array4;
use std::ffi::{c_char, c_void};

/// A trained model (opaque).
pub struct sfr_model {
    _private: [u8; 0],
}

/// A model shared between threads.
pub struct ModelObj {
    pub model: SfrModel,
}

// SAFETY: `tch::Tensor` is Send but not Sync because libtorch tensors are not safe to *mutate*
// from several threads. Through a `ModelObj` the network is only read: inference runs the
// forward pass in eval mode (batch norm reads its running statistics, dropout is off) under
// no_grad, `save` and the metadata only read, and no `&mut` access exists after construction.
// Concurrent reads of the same tensors are safe in libtorch (their reference counts are atomic).
unsafe impl Sync for ModelObj {}

pub type SegmentationOut = (Volume<u8>, Array4<f32>);

impl HandleKind for ModelObj {
    const C_TYPE: &'static str = "sfr_model";
}

impl ModelObj {
    pub fn register(model: SfrModel) -> *mut sfr_model {
        registry::insert(ModelObj { model }) as *mut sfr_model
    }

    pub fn segment(&self, image: &Volume<f32>, reporter: Option<&Reporter>) -> crate::Result<SegmentationOut> {
        self.model.segment(image, reporter)
    }
}

/// Loads a `.sfrmodel` file onto `device`: "cpu", "cuda" or "auto" (CUDA when available; NULL
/// means "auto"). Unreadable file: SFR_ERR_IO; not a model or a corrupt one: SFR_ERR_FORMAT;
/// "cuda" without a GPU: SFR_ERR_INVALID_ARGUMENT, saying whether libtorch_cuda is loaded at
/// all (`sfr_device_info` tells beforehand what "auto" picks). Free with `sfr_model_free`.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_load(path: *const c_char, device: *const c_char, out: *mut *mut sfr_model) -> sfr_status {
    guard("sfr_model_load", || {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let path = c_path(path, "path")?;
        let device = if device.is_null() { "auto" } else { c_str(device, "device")? };
        let device = crate::nn::parse_device(device)?;
        let model = SfrModel::load(path, device)?;
        *out = ModelObj::register(model);
        Ok(())
    })
}

/// Saves the model to `path` (conventionally `*.sfrmodel`) atomically: a temporary file then a
/// rename, so a failure never leaves a half-written model. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_save(model: *const sfr_model, path: *const c_char) -> sfr_status {
    guard("sfr_model_save", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        let path = c_path(path, "path")?;
        // A missing folder is the caller's I/O problem; say so before the writer reports it
        // as a failed write of the format.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, format!("folder {} does not exist", parent.display()));
            return Err(crate::Error::io(path, e).into());
        }
        m.model.save(path)?;
        Ok(())
    })
}

/// The model's metadata as JSON (classes, patch, training spacing, method, data summary,
/// validation metrics, library version), NUL-terminated. `*needed` (required) receives the
/// size in bytes including the NUL; if `len` < that, returns SFR_ERR_BUFFER_TOO_SMALL and leaves
/// `buf` untouched (`buf` may then be NULL: call once with NULL, 0 to size the buffer).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_metadata_json(model: *const sfr_model, buf: *mut c_char, len: usize, needed: *mut usize) -> sfr_status {
    guard("sfr_model_metadata_json", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        let json = serde_json::to_string(&m.model.meta).map_err(|e| FfiError::invalid(format!("metadata: {e}")))?;
        super::boundary::copy_sized(&json, buf, len, needed, "the metadata")
    })
}

/// Number of classes the model outputs, background included (= the number of probability
/// maps). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_num_classes(model: *const sfr_model, out: *mut usize) -> sfr_status {
    guard("sfr_model_num_classes", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        *out = m.model.num_classes();
        Ok(())
    })
}

/// Number of classes that failed the training check (`training.class_check` of the metadata:
/// never predicted, or far below the others, on the validation cases or else on the labelled
/// training cases). 0: every class passed, or the model predates the check. A model with
/// failed classes segments as any other, but should not be used: show the warning of
/// `sfr_model_check_message`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_failed_classes(model: *const sfr_model, out: *mut usize) -> sfr_status {
    guard("sfr_model_failed_classes", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        *out = ClassCheck::from_training(&m.model.meta.training).map_or(0, |c| c.failed().len());
        Ok(())
    })
}

/// The training check's warning for people (which classes failed, on what, what to try),
/// NUL-terminated; the empty string when every class passed. Sized like
/// `sfr_model_metadata_json`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_check_message(model: *const sfr_model, buf: *mut c_char, len: usize, needed: *mut usize) -> sfr_status {
    guard("sfr_model_check_message", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        let msg = ClassCheck::from_training(&m.model.meta.training).and_then(|c| c.warning()).unwrap_or_default();
        super::boundary::copy_sized(&msg, buf, len, needed, "the check message")
    })
}

/// Frees a model. NULL is a no-op; so is a second free (detected). Calls running on other
/// threads with this model, and segmentation jobs using it, finish normally (they hold their
/// own reference); later calls with the handle fail with SFR_ERR_BAD_HANDLE.
#[no_mangle]
pub unsafe extern "C" fn sfr_model_free(model: *mut sfr_model) {
    if model.is_null() {
        return;
    }
    guard_void("sfr_model_free", || registry::take::<ModelObj>(model as usize).map(drop));
}

/// Segments `image` (any dtype; x fastest, dims i, j, k) synchronously. `labels` receives one
/// label per voxel as `label_dtype` (SFR_DTYPE_U8 or SFR_DTYPE_U16), x fastest, `labels_len`
/// bytes ≥ voxels × 1 or 2. `probabilities` may be NULL; else it receives num_classes × voxels
/// floats, class-major ([c][k][j][i]), `probabilities_len` elements. Outputs are written only on
/// success. The labels have exactly the image's geometry (same dims: copy origin, spacing and
/// direction from the input image; with ITK, `CopyInformation(input)` and
/// `SetRegions(input->GetBufferedRegion())`). An image at another spacing than the model's is
/// resampled to the model's spacing inside, and the labels resampled back onto its grid.
/// Thread-safe: one model may segment from several threads at once.
#[no_mangle]
pub unsafe extern "C" fn sfr_segment(
    model: *const sfr_model,
    image: *const super::view::sfr_volume_view,
    label_dtype: sfr_dtype_raw,
    labels: *mut c_void,
    labels_len: usize,
    probabilities: *mut f32,
    probabilities_len: usize,
) -> sfr_status {
    guard("sfr_segment", || {
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        let v = read_view(image, "image")?;
        // Fail fast on bad output buffers, before minutes of inference.
        let out = SegmentationBuffers { label_dtype, labels, labels_len, probabilities, probabilities_len };
        out.check(m.model.num_classes(), v.voxels())?;
        let img = v.to_volume::<f32>()?;
        let (lab, probs) = m.segment(&img, None)?;
        out.write(&lab, &probs)
    })
}
