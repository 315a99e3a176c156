//! Live handles. A handle given to C is a number from a counter, cast to a pointer type; it maps
//! to a reference-counted object here. Calls look the handle up (a freed, foreign or wrong-kind
//! handle is an error, not undefined behaviour) and work on their own `Arc`, so a concurrent
//! free cannot pull an object from under a running call: it only drops the registry's reference.
use super::dataset::DatasetObj;
use super::job::JobObj;
use super::model::ModelObj;
use super::{FfiError, FfiResult, SFR_ERR_BAD_HANDLE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub enum Object {
    Dataset(Arc<DatasetObj>),
    Job(Arc<JobObj>),
    Model(Arc<ModelObj>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Dataset(_) => "sfr_dataset",
            Object::Job(_) => "sfr_job",
            Object::Model(_) => "sfr_model",
        }
    }
}

static LIVE: Mutex<Option<HashMap<usize, Object>>> = Mutex::new(None);
// Distinctive, aligned-looking values far from small integers; never reused.
static NEXT: AtomicUsize = AtomicUsize::new(0x5F52_0010);

fn live() -> MutexGuard<'static, Option<HashMap<usize, Object>>> {
    // A panic while holding the lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `obj` and returns its handle value.
pub fn insert(obj: Object) -> usize {
    let id = NEXT.fetch_add(16, Ordering::Relaxed);
    live().get_or_insert_with(HashMap::new).insert(id, obj);
    id
}

fn bad_handle(id: usize, want: &str, found: Option<&'static str>) -> FfiError {
    match found {
        Some(kind) => FfiError::new(SFR_ERR_BAD_HANDLE, format!("handle {id:#x} is an {kind}, not an {want}")),
        None => FfiError::new(
            SFR_ERR_BAD_HANDLE,
            format!("{id:#x} is not a live {want} handle (already freed, or not created by this library)"),
        ),
    }
}

macro_rules! getter {
    ($get:ident, $take:ident, $variant:ident, $t:ty, $name:literal) => {
        /// The object behind a handle of this kind (NULL, freed, foreign or wrong kind: error).
        pub fn $get(id: usize, what: &str) -> FfiResult<Arc<$t>> {
            if id == 0 {
                return Err(FfiError::null(what));
            }
            let g = live();
            match g.as_ref().and_then(|m| m.get(&id)) {
                Some(Object::$variant(o)) => Ok(o.clone()),
                other => Err(bad_handle(id, $name, other.map(Object::kind))),
            }
        }
        /// Unregisters a handle of this kind and returns its object (for the frees).
        pub fn $take(id: usize) -> FfiResult<Arc<$t>> {
            let mut g = live();
            let m = g.get_or_insert_with(HashMap::new);
            match m.get(&id) {
                Some(Object::$variant(_)) => match m.remove(&id) {
                    Some(Object::$variant(o)) => Ok(o),
                    _ => unreachable!("checked above"),
                },
                other => Err(bad_handle(id, $name, other.map(Object::kind))),
            }
        }
    };
}

getter!(dataset, take_dataset, Dataset, DatasetObj, "sfr_dataset");
getter!(job, take_job, Job, JobObj, "sfr_job");
getter!(model, take_model, Model, ModelObj, "sfr_model");

/// Number of live handles of every kind (for leak checks in tests).
pub fn live_count() -> usize {
    live().as_ref().map(|m| m.len()).unwrap_or(0)
}
