//! Live handles. A handle given to C is a number from a counter, cast to a pointer type; it maps
//! to a reference-counted object here. Calls look the handle up (a freed, foreign or wrong-kind
//! handle is an error, not undefined behaviour) and work on their own `Arc`, so a concurrent
//! free cannot pull an object from under a running call: it only drops the registry's reference.
//!
//! The registry knows no kind of handle: each kind (`DatasetObj`, `JobObj`, `ModelObj`)
//! implements [`HandleKind`] in its own file, as rustls-ffi's castable types do, while keeping
//! our integer handles (never dereferenced, so a foreign pointer is caught rather than read).
use super::boundary::{FfiError, FfiResult, SFR_ERR_BAD_HANDLE};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// An object that C holds through an opaque handle.
pub trait HandleKind: Any + Send + Sync {
    /// The C type of its handle, for messages ("sfr_dataset").
    const C_TYPE: &'static str;
}

struct Entry {
    c_type: &'static str,
    object: Arc<dyn Any + Send + Sync>,
}

static LIVE: Mutex<Option<HashMap<usize, Entry>>> = Mutex::new(None);
// Distinctive, aligned-looking values far from small integers; never reused.
static NEXT: AtomicUsize = AtomicUsize::new(0x5F52_0010);

fn live() -> MutexGuard<'static, Option<HashMap<usize, Entry>>> {
    // A panic while holding the lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `obj` and returns its handle value.
pub fn insert<T: HandleKind>(obj: T) -> usize {
    let id = NEXT.fetch_add(16, Ordering::Relaxed);
    live().get_or_insert_with(HashMap::new).insert(id, Entry { c_type: T::C_TYPE, object: Arc::new(obj) });
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

/// The object behind a handle of kind `T` (NULL, freed, foreign or wrong kind: error).
pub fn get<T: HandleKind>(id: usize, what: &str) -> FfiResult<Arc<T>> {
    if id == 0 {
        return Err(FfiError::null(what));
    }
    let g = live();
    match g.as_ref().and_then(|m| m.get(&id)) {
        Some(e) => e.object.clone().downcast::<T>().map_err(|_| bad_handle(id, T::C_TYPE, Some(e.c_type))),
        None => Err(bad_handle(id, T::C_TYPE, None)),
    }
}

/// Unregisters a handle of kind `T` and returns its object (for the frees). A handle of
/// another kind stays registered.
pub fn take<T: HandleKind>(id: usize) -> FfiResult<Arc<T>> {
    let mut g = live();
    let m = g.get_or_insert_with(HashMap::new);
    match m.get(&id) {
        Some(e) if e.object.is::<T>() => {
            let e = m.remove(&id).expect("present: checked above under the same lock");
            Ok(e.object.downcast::<T>().unwrap_or_else(|_| unreachable!("type checked above")))
        }
        other => Err(bad_handle(id, T::C_TYPE, other.map(|e| e.c_type))),
    }
}

/// Number of live handles of every kind (for leak checks in tests).
pub fn live_count() -> usize {
    live().as_ref().map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::boundary::SFR_ERR_NULL_POINTER;

    #[derive(Debug)]
    struct Apple;
    #[derive(Debug)]
    struct Pear;
    impl HandleKind for Apple {
        const C_TYPE: &'static str = "sfr_apple";
    }
    impl HandleKind for Pear {
        const C_TYPE: &'static str = "sfr_pear";
    }

    #[test]
    fn kinds_are_told_apart_and_freed_handles_are_dead() {
        let a = insert(Apple);
        let e = get::<Pear>(a, "pear").unwrap_err();
        assert_eq!(e.status, SFR_ERR_BAD_HANDLE);
        assert!(e.message.contains("is an sfr_apple, not an sfr_pear"), "{}", e.message);
        // taking it as the wrong kind leaves it registered
        assert!(take::<Pear>(a).is_err());
        assert!(get::<Apple>(a, "apple").is_ok());
        take::<Apple>(a).unwrap();
        assert!(get::<Apple>(a, "apple").unwrap_err().message.contains("not a live sfr_apple"));
        assert!(take::<Apple>(a).is_err(), "a second free is detected");
        assert_eq!(get::<Apple>(0, "apple").unwrap_err().status, SFR_ERR_NULL_POINTER);
    }
}
