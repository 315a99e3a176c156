//! Datasets in memory: labelled and unlabelled cases copied in from volume views, checked as
//! they arrive (so a bad label is reported by the call that adds it, not minutes into training).
use super::registry::{self, Object};
use super::view::read_view;
use super::{c_str, guard, guard_void, sfr_status, FfiError, FfiResult};
use crate::pipeline::data::{check_label, CaseSource};
use std::collections::BTreeMap;
use std::ffi::c_char;
use std::sync::{Arc, Mutex};

/// An in-memory dataset: class names and cases (opaque).
pub struct sfr_dataset {
    _private: [u8; 0],
}

pub struct DatasetState {
    pub classes: BTreeMap<u16, String>,
    pub labeled: Vec<CaseSource>,
    pub unlabeled: Vec<CaseSource>,
}

pub struct DatasetObj {
    pub state: Mutex<DatasetState>,
}

impl DatasetObj {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, DatasetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses `{"0": "background", "1": "liver"}`: integer keys 0..N-1 (all present, N ≥ 2,
/// N ≤ 256 since labels are stored as bytes), string names.
pub fn parse_classes(text: &str) -> FfiResult<BTreeMap<u16, String>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| FfiError::invalid(format!("classes_json is not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| FfiError::invalid("classes_json must be a JSON object such as {\"0\": \"background\", \"1\": \"liver\"}"))?;
    let mut classes = BTreeMap::new();
    for (k, name) in obj {
        let idx: u16 = k
            .parse()
            .ok()
            .filter(|&i: &u16| i < 256)
            .ok_or_else(|| FfiError::invalid(format!("classes_json: key \"{k}\" is not a class index in 0..255")))?;
        let name = name.as_str().ok_or_else(|| FfiError::invalid(format!("classes_json: the name of class {k} must be a string")))?;
        if classes.insert(idx, name.to_string()).is_some() {
            return Err(FfiError::invalid(format!("classes_json: class {idx} is given twice")));
        }
    }
    // The same check as dataset.json's and the pipeline's (io::dataset::check_classes).
    crate::limits::check_classes("classes_json", classes.keys())?;
    Ok(classes)
}

/// Creates an empty dataset whose classes are `classes_json`, a JSON object from class index
/// to name with the background included: `{"0": "background", "1": "liver"}` (indices 0..N-1,
/// no gaps). Free it with `sfr_dataset_free`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_new(classes_json: *const c_char, out: *mut *mut sfr_dataset) -> sfr_status {
    guard("sfr_dataset_new", || {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let classes = parse_classes(c_str(classes_json, "classes_json")?)?;
        let obj = DatasetObj { state: Mutex::new(DatasetState { classes, labeled: vec![], unlabeled: vec![] }) };
        *out = registry::insert(Object::Dataset(Arc::new(obj))) as *mut sfr_dataset;
        Ok(())
    })
}

fn make_case_id(state: &DatasetState, id: *const c_char) -> FfiResult<String> {
    let id = if id.is_null() {
        format!("case{:03}", state.labeled.len() + state.unlabeled.len())
    } else {
        let s = unsafe { c_str(id, "case_id")? };
        if s.is_empty() {
            return Err(FfiError::invalid("case_id is empty (pass NULL for an automatic id)"));
        }
        s.to_string()
    };
    if state.labeled.iter().chain(&state.unlabeled).any(|c| c.id() == id) {
        return Err(FfiError::invalid(format!("case id '{id}' is already in the dataset")));
    }
    Ok(id)
}

fn check_finite(image: &crate::volume::Volume<f32>, id: &str) -> FfiResult<()> {
    if image.data.iter().any(|v| !v.is_finite()) {
        return Err(FfiError::invalid(format!("case {id}: the image contains NaN or infinite voxels")));
    }
    Ok(())
}

/// Adds a labelled case: `image` (any dtype) and `label` (any dtype with integral values that
/// are declared classes; same dims and geometry as the image). Both are copied; the caller may
/// free its buffers when the call returns. `case_id` may be NULL (an id is made up); ids must
/// be unique. Thread-safe (calls on one dataset are serialised).
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_add_labeled(
    ds: *mut sfr_dataset,
    case_id: *const c_char,
    image: *const super::sfr_volume_view,
    label: *const super::sfr_volume_view,
) -> sfr_status {
    guard("sfr_dataset_add_labeled", || {
        let obj = registry::dataset(ds as usize, "ds")?;
        let img = read_view(image, "image")?;
        let lab = read_view(label, "label")?;
        let mut st = obj.lock();
        let id = make_case_id(&st, case_id)?;
        if lab.dims != img.dims {
            return Err(FfiError::invalid(format!("case {id}: label dims {:?} differ from image dims {:?}", lab.dims, img.dims)));
        }
        let tol = 1e-3 * img.geometry.spacing.iter().cloned().fold(1.0, f64::max);
        if lab.geometry.max_abs_diff(&img.geometry) > tol {
            return Err(FfiError::invalid(format!("case {id}: label geometry {:?} differs from the image's {:?}", lab.geometry, img.geometry)));
        }
        let image = img.to_volume::<f32>()?;
        check_finite(&image, &id)?;
        let label = lab.to_volume::<f64>()?;
        check_label(&label, st.classes.len(), &format!("case {id} (label)"))?;
        st.labeled.push(CaseSource::Memory { id, image, label: Some(label) });
        Ok(())
    })
}

/// Adds an unlabelled case (`image` of any dtype, copied). `case_id` may be NULL.
/// Thread-safe (calls on one dataset are serialised).
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_add_unlabeled(ds: *mut sfr_dataset, case_id: *const c_char, image: *const super::sfr_volume_view) -> sfr_status {
    guard("sfr_dataset_add_unlabeled", || {
        let obj = registry::dataset(ds as usize, "ds")?;
        let img = read_view(image, "image")?;
        let mut st = obj.lock();
        let id = make_case_id(&st, case_id)?;
        let image = img.to_volume::<f32>()?;
        check_finite(&image, &id)?;
        st.unlabeled.push(CaseSource::Memory { id, image, label: None });
        Ok(())
    })
}

/// Numbers of labelled and unlabelled cases. Either output may be NULL if not wanted.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_counts(ds: *const sfr_dataset, labeled: *mut usize, unlabeled: *mut usize) -> sfr_status {
    guard("sfr_dataset_counts", || {
        let obj = registry::dataset(ds as usize, "ds")?;
        let st = obj.lock();
        if !labeled.is_null() {
            *labeled = st.labeled.len();
        }
        if !unlabeled.is_null() {
            *unlabeled = st.unlabeled.len();
        }
        Ok(())
    })
}

/// Frees a dataset. NULL is a no-op; so is a second free of the same handle (detected; the
/// last error message says so). Jobs started from the dataset keep their own copy of the cases
/// and are not affected. Thread-safe: calls on the same dataset running on other threads
/// complete normally; later ones fail with SFR_ERR_BAD_HANDLE.
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_free(ds: *mut sfr_dataset) {
    if ds.is_null() {
        return;
    }
    guard_void("sfr_dataset_free", || registry::take_dataset(ds as usize).map(drop));
}
