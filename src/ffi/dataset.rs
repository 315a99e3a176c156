//! Datasets in memory: labelled and unlabelled cases copied in from volume views, checked as
//! they arrive (so a bad label is reported by the call that adds it, not minutes into training).
use super::registry::{self, HandleKind};
use super::view::{read_view, ViewIn};
use super::boundary::{c_str, guard, guard_void, sfr_status, FfiError, FfiResult};
use crate::limits::Classes;
use crate::pipeline::data::{check_label_values, CaseSource};
use crate::volume::{DType, Volume};
use std::collections::BTreeMap;
use std::ffi::c_char;
use std::sync::Mutex;

/// An in-memory dataset: class names and cases (opaque).
pub struct sfr_dataset {
    _private: [u8; 0],
}

pub struct DatasetState {
    pub classes: Classes,
    pub labeled: Vec<CaseSource>,
    pub unlabeled: Vec<CaseSource>,
}

pub struct DatasetObj {
    pub state: Mutex<DatasetState>,
}

impl HandleKind for DatasetObj {
    const C_TYPE: &'static str = "sfr_dataset";
}

impl DatasetObj {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, DatasetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses `{"0": "background", "1": "liver"}`: integer keys 0..N-1 (all present, N ≥ 2,
/// N ≤ 256 since labels are stored as bytes), string names.
pub fn parse_classes(text: &str) -> FfiResult<Classes> {
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
    // The same rule as dataset.json's, the pipeline's and model files' (limits::Classes).
    Ok(Classes::new("classes_json", classes)?)
}

/// Creates an empty dataset whose classes are `classes_json`, a JSON object from class index
/// to name with the background included: `{"0": "background", "1": "liver"}` (indices 0..N-1,
/// no gaps, 2 ≤ N ≤ 256: labels are stored as bytes, so 255 is the largest class index).
/// Free it with `sfr_dataset_free`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_new(classes_json: *const c_char, out: *mut *mut sfr_dataset) -> sfr_status {
    guard("sfr_dataset_new", || {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let classes = parse_classes(c_str(classes_json, "classes_json")?)?;
        let obj = DatasetObj { state: Mutex::new(DatasetState { classes, labeled: vec![], unlabeled: vec![] }) };
        *out = registry::insert(obj) as *mut sfr_dataset;
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

/// The label as u8 (classes are fewer than 256), its values checked in the caller's type first
/// so that nothing is narrowed before it is checked. A u8 label is checked as is; f64 keeps its
/// precision; every other type is checked as f32, which holds every integer up to 2^24 exactly
/// (far beyond the class range), instead of widening a big label to f64.
fn label_u8(lab: &ViewIn<'_>, num_classes: usize, what: &str) -> FfiResult<Volume<u8>> {
    Ok(match lab.dtype {
        DType::U8 => {
            let l = lab.to_volume::<u8>()?;
            check_label_values(&l, num_classes, what)?;
            l
        }
        DType::F64 => {
            let l = lab.to_volume::<f64>()?;
            check_label_values(&l, num_classes, what)?;
            l.cast()
        }
        _ => {
            let l = lab.to_volume::<f32>()?;
            check_label_values(&l, num_classes, what)?;
            l.cast()
        }
    })
}

/// A clear error instead of the out-of-memory killer (which would take the host application,
/// e.g. Slicer, down with it) when copying a case cannot fit in the memory available now.
fn check_fits(bytes: usize, id: &str) -> FfiResult<()> {
    if let Some(avail) = crate::limits::available_memory() {
        if bytes as u64 > avail {
            return Err(FfiError::invalid(format!(
                "case {id}: copying it needs {:.1} GB of memory, but only {:.1} GB is available",
                bytes as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
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
    image: *const super::view::sfr_volume_view,
    label: *const super::view::sfr_volume_view,
) -> sfr_status {
    guard("sfr_dataset_add_labeled", || {
        let obj = registry::get::<DatasetObj>(ds as usize, "ds")?;
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
        check_fits(img.voxels() * (4 + 1), &id)?;
        let image = img.to_volume::<f32>()?;
        check_finite(&image, &id)?;
        let label = label_u8(&lab, st.classes.len(), &format!("case {id} (label)"))?;
        st.labeled.push(CaseSource::memory(id, image, Some(label)));
        Ok(())
    })
}

/// Adds an unlabelled case (`image` of any dtype, copied). `case_id` may be NULL.
/// Thread-safe (calls on one dataset are serialised).
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_add_unlabeled(ds: *mut sfr_dataset, case_id: *const c_char, image: *const super::view::sfr_volume_view) -> sfr_status {
    guard("sfr_dataset_add_unlabeled", || {
        let obj = registry::get::<DatasetObj>(ds as usize, "ds")?;
        let img = read_view(image, "image")?;
        let mut st = obj.lock();
        let id = make_case_id(&st, case_id)?;
        check_fits(img.voxels() * 4, &id)?;
        let image = img.to_volume::<f32>()?;
        check_finite(&image, &id)?;
        st.unlabeled.push(CaseSource::memory(id, image, None));
        Ok(())
    })
}

/// Numbers of labelled and unlabelled cases. Either output may be NULL if not wanted.
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_dataset_counts(ds: *const sfr_dataset, labeled: *mut usize, unlabeled: *mut usize) -> sfr_status {
    guard("sfr_dataset_counts", || {
        let obj = registry::get::<DatasetObj>(ds as usize, "ds")?;
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
    guard_void("sfr_dataset_free", || registry::take::<DatasetObj>(ds as usize).map(drop));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::view::{sfr_dtype_raw, sfr_volume_view};
    use crate::pipeline::data::load_source;

    fn view<T>(data: &[T], dtype: sfr_dtype_raw, dims: [usize; 3]) -> sfr_volume_view {
        sfr_volume_view {
            data: data.as_ptr() as *const std::ffi::c_void,
            data_len: std::mem::size_of_val(data),
            dtype,
            dims,
            spacing: [1.0; 3],
            origin: [0.0; 3],
            direction: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        }
    }

    fn last_error() -> String {
        crate::ffi::boundary::LAST_ERROR.with(|m| m.borrow().clone())
    }

    fn dataset() -> *mut sfr_dataset {
        let classes = std::ffi::CString::new(r#"{"0": "background", "1": "organ", "2": "lesion"}"#).unwrap();
        let mut ds: *mut sfr_dataset = std::ptr::null_mut();
        assert_eq!(unsafe { sfr_dataset_new(classes.as_ptr(), &mut ds) }, sfr_status::SFR_OK);
        ds
    }

    #[test]
    fn labels_of_any_type_are_checked_unnarrowed_and_stored_as_u8() {
        let ds = dataset();
        let img = vec![1.0f32; 24];
        let vi = view(&img, 6, [4, 3, 2]);
        // u16 300: an error naming 300 (narrowing first would have made it 255 or 44).
        let mut wide = vec![0u16; 24];
        wide[5] = 300;
        assert_eq!(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), &vi, &view(&wide, 2, [4, 3, 2])) }, sfr_status::SFR_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("label value 300"), "{}", last_error());
        // f64 1.5: not a class index.
        let mut half = vec![0.0f64; 24];
        half[3] = 1.5;
        assert_eq!(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), &vi, &view(&half, 7, [4, 3, 2])) }, sfr_status::SFR_ERR_INVALID_ARGUMENT);
        // i16 and f64 labels with class values are accepted and stored as the same u8 label.
        let mut ok = vec![0i16; 24];
        ok[7] = 2;
        ok[8] = 1;
        let okf: Vec<f64> = ok.iter().map(|&v| v as f64).collect();
        assert_eq!(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), &vi, &view(&ok, 3, [4, 3, 2])) }, sfr_status::SFR_OK);
        assert_eq!(unsafe { sfr_dataset_add_labeled(ds, std::ptr::null(), &vi, &view(&okf, 7, [4, 3, 2])) }, sfr_status::SFR_OK);
        let obj = registry::get::<DatasetObj>(ds as usize, "ds").unwrap();
        {
            let st = obj.lock();
            assert_eq!(st.labeled.len(), 2);
            for case in &st.labeled {
                let CaseSource::Memory { label: Some(l), .. } = case else { panic!("not an in-memory labelled case") };
                assert_eq!(l.data.as_slice().unwrap()[7..9], [2u8, 1]);
                assert_eq!(load_source(case, 3).unwrap().label.unwrap().sum(), 3);
            }
        }
        unsafe { sfr_dataset_free(ds) };
    }

    #[test]
    fn a_case_that_cannot_fit_in_memory_is_an_error() {
        if crate::limits::available_memory().is_none() {
            return; // no /proc/meminfo: nothing is checked
        }
        let err = check_fits(usize::MAX / 2, "huge").unwrap_err();
        assert!(err.message.contains("case huge: copying it needs"), "{}", err.message);
        assert!(check_fits(1, "tiny").is_ok());
    }
}
