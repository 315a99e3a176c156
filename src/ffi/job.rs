//! Jobs: training and big segmentations on a library thread. A GUI polls from a timer (never
//! blocks), may cancel, and waits for the result once the job has finished.
//!
//! The job's progress is mirrored (through `Job`'s progress callback) into this module's own
//! state, so that `sfr_job_poll` takes only a short lock, and `sfr_job_wait` can block on a
//! condition variable without holding the lock that `sfr_job_cancel` needs.
use super::dataset::DatasetObj;
use super::model::{ModelObj, SegmentationOut};
use super::registry::{self, HandleKind};
use super::view::{read_view, sfr_dtype_raw, SegmentationBuffers};
use super::boundary::{c_str, copy_truncated, guard, guard_void, sfr_status, FfiError, FfiResult};
use crate::job::{Job, Progress};
use crate::model::SfrModel;
use crate::pipeline::config::TrainConfig;
use crate::pipeline::data::CaseSource;
use crate::pipeline::{train, RunOptions, TrainInputs};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

/// A running or finished job (opaque).
pub struct sfr_job {
    _private: [u8; 0],
}

/// A snapshot of a job's progress (filled by `sfr_job_poll`, passed to progress callbacks).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct sfr_progress {
    /// Stage name, NUL-terminated (truncated): "load", "finetune", "pseudolabel", "retrain",
    /// "validate", "segment"; empty before the first stage starts.
    pub stage: [c_char; 32],
    /// Steps done and total steps of the stage.
    pub step: u64,
    pub total: u64,
    /// Latest loss of the stage; NaN when none.
    pub loss: f64,
    /// Estimated seconds left in the stage; negative when unknown.
    pub eta_seconds: f64,
    /// Human-readable message, NUL-terminated (truncated).
    pub message: [c_char; 256],
    /// 1 once the job has ended (its result is ready for `sfr_job_wait`), else 0.
    pub finished: c_int,
}

/// Progress callback: called on the job's thread at every progress update (often: keep it
/// short, copy what you need), the last time with `finished` = 1. `progress` is valid only
/// during the call. On its own job it must not call `sfr_job_wait` or
/// `sfr_job_wait_segmentation` (they return SFR_ERR_STATE: the job would wait for itself). It
/// may call `sfr_job_free` on its own job: that cancels the job and returns at once, and the
/// callback is then called one last time, with `finished` = 1 (unless this call already had
/// it), so `user_data` must stay valid until that call.
pub type sfr_progress_callback = Option<unsafe extern "C" fn(progress: *const sfr_progress, user_data: *mut c_void)>;

pub fn progress_to_c(p: &Progress) -> sfr_progress {
    let mut out = sfr_progress {
        stage: [0; 32],
        step: p.step,
        total: p.total,
        loss: p.loss,
        eta_seconds: p.eta_seconds,
        message: [0; 256],
        finished: p.finished as c_int,
    };
    copy_truncated(&p.stage, &mut out.stage);
    copy_truncated(&p.message, &mut out.message);
    out
}

/// The caller's `user_data`, handed back to its callback on the job thread; the caller promises
/// (documented) that the callback may be called from another thread.
struct UserData(*mut c_void);
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

pub struct JobState {
    progress: Mutex<Progress>,
    finished: Condvar,
    thread: Mutex<Option<ThreadId>>,
}

enum Work {
    Train(Job<SfrModel>),
    Segment { job: Job<SegmentationOut>, dims: [usize; 3], classes: usize },
}

struct Inner {
    work: Work,
    taken: bool,
}

pub struct JobObj {
    state: Arc<JobState>,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl JobState {
    fn new() -> Arc<JobState> {
        Arc::new(JobState {
            progress: Mutex::new(Progress { loss: f64::NAN, eta_seconds: -1.0, message: "starting".into(), ..Default::default() }),
            finished: Condvar::new(),
            thread: Mutex::new(None),
        })
    }

    /// The callback given to `Job::spawn`: mirror, wake waiters, then call the caller's callback.
    fn callback(self: &Arc<Self>, user: Option<(unsafe extern "C" fn(*const sfr_progress, *mut c_void), UserData)>) -> Box<dyn Fn(&Progress) + Send + Sync> {
        let st = self.clone();
        Box::new(move |p: &Progress| {
            // The caller's callback first: once a waiter sees `finished`, no callback is running
            // or will run, so the caller may release `user_data`.
            if let Some((cb, ud)) = &user {
                let c = progress_to_c(p);
                unsafe { cb(&c, ud.0) };
            }
            *lock(&st.progress) = p.clone();
            if p.finished {
                st.finished.notify_all();
            }
        })
    }

    fn record_thread(&self) {
        *lock(&self.thread) = Some(std::thread::current().id());
    }

    fn on_job_thread(&self) -> bool {
        *lock(&self.thread) == Some(std::thread::current().id())
    }

    fn wait_finished(&self) {
        let mut p = lock(&self.progress);
        while !p.finished {
            p = self.finished.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl HandleKind for JobObj {
    const C_TYPE: &'static str = "sfr_job";
}

impl JobObj {
    fn cancel(&self) {
        match &lock(&self.inner).work {
            Work::Train(j) => j.cancel(),
            Work::Segment { job, .. } => job.cancel(),
        }
    }
}

fn register(state: Arc<JobState>, work: Work) -> *mut sfr_job {
    let obj = JobObj { state, inner: Mutex::new(Inner { work, taken: false }) };
    registry::insert(obj) as *mut sfr_job
}

unsafe fn start_training(ds: *const super::dataset::sfr_dataset, config_json: *const c_char, cb: sfr_progress_callback, user_data: *mut c_void, out: *mut *mut sfr_job) -> FfiResult<()> {
    if out.is_null() {
        return Err(FfiError::null("out"));
    }
    let ds = registry::get::<DatasetObj>(ds as usize, "ds")?;
    let cfg = TrainConfig::from_user_json(c_str(config_json, "config_json")?)?;
    let inputs = {
        let st = ds.lock();
        if st.labeled.is_empty() {
            return Err(FfiError::invalid("the dataset has no labelled case (sfr_dataset_add_labeled): at least one is needed"));
        }
        // A validation split that cannot be met is refused here, not when the job starts.
        crate::pipeline::validation_count(cfg.validation_cases, st.labeled.len())?;
        // Training loads every case as a z-scored f32 image plus a u8 label: refuse now, with
        // a message, what would otherwise end in the out-of-memory killer.
        let voxels: usize = st.labeled.iter().chain(&st.unlabeled).map(source_voxels).sum();
        if let Some(avail) = crate::limits::available_memory() {
            let need = voxels as u64 * 5;
            if need > avail {
                return Err(FfiError::invalid(format!(
                    "training on {} cases ({voxels} voxels) needs about {:.1} GB of memory for the loaded cases, but only {:.1} GB is available",
                    st.labeled.len() + st.unlabeled.len(),
                    need as f64 / 1e9,
                    avail as f64 / 1e9
                )));
            }
        }
        // Shallow: in-memory volumes are shared (`Arc`), not copied (CaseSource).
        TrainInputs { labeled: st.labeled.clone(), unlabeled: st.unlabeled.clone(), classes: st.classes.clone(), dataset_name: "memory".into() }
    };
    let state = JobState::new();
    let st = state.clone();
    let job = Job::spawn(Some(state.callback(cb.map(|f| (f, UserData(user_data))))), move |r| {
        st.record_thread();
        train(&cfg, &inputs, &RunOptions::default(), r)
    })?;
    *out = register(state, Work::Train(job));
    Ok(())
}

fn source_voxels(c: &CaseSource) -> usize {
    match c {
        CaseSource::Memory { image, .. } => image.len(),
        CaseSource::Files(_) => 0,
    }
}

/// Starts training on a copy of the dataset's cases (the dataset may be changed or freed
/// afterwards) and returns the job in `*out`. `config_json` is either a full config (it has
/// "version") or {"preset": NAME, ...overrides}, e.g. {"preset": "cpu-small", "vnet":
/// {"iterations": 300}}; unknown keys and bad values are SFR_ERR_INVALID_ARGUMENT here, not
/// later. Poll with `sfr_job_poll`, get the model with `sfr_job_wait`. Thread-safe, with one
/// caveat: the config's `seed` and `threads` act on libtorch's process-wide state (its global
/// random generator, which a training reseeds from `seed` at every iteration, and its intra-op
/// thread count, which `threads` sets for the whole process, later segmentations included:
/// `threads` > 0 fixes it, 0 (the default) sizes training's to the cores that other work leaves
/// free, re-checked during the run, and segments at libtorch's default count so that labels do
/// not depend on the load). Two trainings running at once in one process are therefore not
/// reproducible: run them one after the other when results must repeat (with a fixed
/// `threads` when they must repeat bit for bit, since the thread count changes the order of
/// floating-point sums).
#[no_mangle]
pub unsafe extern "C" fn sfr_train_start(ds: *const super::dataset::sfr_dataset, config_json: *const c_char, out: *mut *mut sfr_job) -> sfr_status {
    guard("sfr_train_start", || start_training(ds, config_json, None, std::ptr::null_mut(), out))
}

/// `sfr_train_start` with a progress callback (NULL = none), called on the job's thread with
/// `user_data`; `user_data` must stay valid until `sfr_job_free` returns (or, when the callback
/// frees its own job, until the callback's last call, the one with `finished` = 1).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_train_start_with_callback(
    ds: *const super::dataset::sfr_dataset,
    config_json: *const c_char,
    cb: sfr_progress_callback,
    user_data: *mut c_void,
    out: *mut *mut sfr_job,
) -> sfr_status {
    guard("sfr_train_start_with_callback", || start_training(ds, config_json, cb, user_data, out))
}

/// Starts segmenting a copy of `image` (any dtype) with `model` on a library thread; the result
/// is collected with `sfr_job_wait_segmentation`. The job keeps the model alive: freeing the
/// model handle meanwhile is allowed. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_segment_start(model: *const super::model::sfr_model, image: *const super::view::sfr_volume_view, out: *mut *mut sfr_job) -> sfr_status {
    guard("sfr_segment_start", || {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let m = registry::get::<ModelObj>(model as usize, "model")?;
        let v = read_view(image, "image")?;
        let img = v.to_volume::<f32>()?;
        let (dims, classes) = (v.dims, m.model.num_classes());
        let state = JobState::new();
        let st = state.clone();
        let job = Job::spawn(Some(state.callback(None)), move |r| {
            st.record_thread();
            ModelObj::segment(&m, &img, Some(r))
        })?;
        *out = register(state, Work::Segment { job, dims, classes });
        Ok(())
    })
}

/// Copies the job's latest progress into `*out`. Never blocks (beyond a short lock), so a GUI
/// can call it from a timer. Works on finished jobs too (`finished` = 1). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_job_poll(job: *const sfr_job, out: *mut sfr_progress) -> sfr_status {
    guard("sfr_job_poll", || {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        let j = registry::get::<JobObj>(job as usize, "job")?;
        let p = lock(&j.state.progress).clone();
        *out = progress_to_c(&p);
        Ok(())
    })
}

/// Asks the job to stop at its next step (training checks often: well under a second on a
/// CPU). Returns at once; idempotent; cancelling a finished job is OK and changes nothing.
/// `sfr_job_wait` then reports SFR_ERR_CANCELLED. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_job_cancel(job: *mut sfr_job) -> sfr_status {
    guard("sfr_job_cancel", || {
        registry::get::<JobObj>(job as usize, "job")?.cancel();
        Ok(())
    })
}

/// Takes the result of a finished job, for `wait` (called once the job has finished).
fn take<T>(j: &JobObj, f: impl FnOnce(&mut Work) -> FfiResult<T>) -> FfiResult<T> {
    let mut inner = lock(&j.inner);
    if inner.taken {
        return Err(FfiError::state("the job's result was already taken"));
    }
    inner.taken = true;
    f(&mut inner.work)
}

fn not_on_job_thread(j: &JobObj) -> FfiResult<()> {
    if j.state.on_job_thread() {
        return Err(FfiError::state("called from the job's own progress callback (it would wait for itself)"));
    }
    Ok(())
}

/// Blocks until a training job ends and puts the trained model in `*out_model` (free it with
/// `sfr_model_free`). Failure statuses are the job's: SFR_ERR_CANCELLED after a cancel,
/// SFR_ERR_INVALID_ARGUMENT for bad data, ... The result (model or error) is taken once: a
/// second call gives SFR_ERR_STATE, as does calling it on a segmentation job (use
/// `sfr_job_wait_segmentation`). Thread-safe; other threads may poll and cancel meanwhile.
#[no_mangle]
pub unsafe extern "C" fn sfr_job_wait(job: *mut sfr_job, out_model: *mut *mut super::model::sfr_model) -> sfr_status {
    guard("sfr_job_wait", || {
        if out_model.is_null() {
            return Err(FfiError::null("out_model"));
        }
        let j = registry::get::<JobObj>(job as usize, "job")?;
        not_on_job_thread(&j)?;
        if matches!(lock(&j.inner).work, Work::Segment { .. }) {
            return Err(FfiError::state("this is a segmentation job: collect it with sfr_job_wait_segmentation"));
        }
        j.state.wait_finished();
        let model = take(&j, |w| match w {
            Work::Train(t) => Ok(t.wait()?),
            Work::Segment { .. } => unreachable!("checked above"),
        })?;
        *out_model = ModelObj::register(model);
        Ok(())
    })
}

/// Blocks until a segmentation job (`sfr_segment_start`) ends and writes its labels (and, when
/// `probabilities` is not NULL, the class probabilities) as `sfr_segment` does. The buffers are
/// checked before waiting: a wrong dtype or short buffer returns at once and leaves the result
/// in place for a corrected call. Result taken once (second call: SFR_ERR_STATE).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn sfr_job_wait_segmentation(
    job: *mut sfr_job,
    label_dtype: sfr_dtype_raw,
    labels: *mut c_void,
    labels_len: usize,
    probabilities: *mut f32,
    probabilities_len: usize,
) -> sfr_status {
    guard("sfr_job_wait_segmentation", || {
        let j = registry::get::<JobObj>(job as usize, "job")?;
        not_on_job_thread(&j)?;
        let (dims, classes) = match &lock(&j.inner).work {
            Work::Segment { dims, classes, .. } => (*dims, *classes),
            Work::Train(_) => return Err(FfiError::state("this is a training job: collect it with sfr_job_wait")),
        };
        let out = SegmentationBuffers { label_dtype, labels, labels_len, probabilities, probabilities_len };
        out.check(classes, dims.iter().product())?;
        j.state.wait_finished();
        let (lab, probs) = take(&j, |w| match w {
            Work::Segment { job, .. } => Ok(job.wait()?),
            Work::Train(_) => unreachable!("checked above"),
        })?;
        out.write(&lab, &probs)
    })
}

/// Frees a job: a running job is cancelled and joined first, so no library thread outlives it
/// and the progress callback is not called after this returns. NULL is a no-op; so is a
/// second free (detected). It may also be called from the job's own progress callback: then
/// it cancels the job and returns at once (the join happens on a helper thread), and the
/// callback is called one last time with `finished` = 1 (see `sfr_progress_callback`).
/// Thread-safe: a `sfr_job_wait` blocked on another thread returns normally (with
/// SFR_ERR_CANCELLED if the job had not finished).
#[no_mangle]
pub unsafe extern "C" fn sfr_job_free(job: *mut sfr_job) {
    if job.is_null() {
        return;
    }
    guard_void("sfr_job_free", || {
        let j = registry::take::<JobObj>(job as usize)?;
        j.cancel();
        if j.state.on_job_thread() {
            std::thread::spawn(move || drop(j));
        } else {
            // Join here even if another thread still holds a reference (a wait in progress).
            j.state.wait_finished();
            drop(j);
        }
        Ok(())
    });
}
