//! Background jobs: long work (training, big segmentations) runs on a library thread; the caller
//! polls progress (stage, step, total, loss, ETA), may cancel, and waits for the result.
//!
//! Cancellation is cooperative: the work calls `Reporter::step` (or `check`) often, and these
//! return `Err(Error::Cancelled)` once cancel was asked, so the work unwinds through its normal
//! error path and leaves no half-written files (every writer in this crate writes to a
//! temporary file and renames).
use crate::error::{Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// A snapshot of a job's progress.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Progress {
    /// Short machine-readable stage name, e.g. "finetune", "pseudolabel", "retrain".
    pub stage: String,
    pub step: u64,
    pub total: u64,
    /// Latest loss of the stage, NaN when none.
    pub loss: f64,
    /// Estimated seconds left in the stage, negative when unknown.
    pub eta_seconds: f64,
    pub message: String,
    /// True once the job has ended (result available to `wait`).
    pub finished: bool,
}

type Callback = Box<dyn Fn(&Progress) + Send + Sync>;

struct Shared {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
    stage_start: Mutex<Instant>,
    /// Every stage started so far, in order, with its start time: where a job's time went.
    stages: Mutex<Vec<(String, Instant)>>,
    callback: Option<Callback>,
}

/// Handed to the work: reports progress and carries the cancellation flag.
#[derive(Clone)]
pub struct Reporter {
    shared: Arc<Shared>,
}

impl Reporter {
    /// A reporter not attached to a job (synchronous calls, tests): progress goes to `callback`.
    pub fn detached(callback: Option<Callback>) -> Reporter {
        Reporter { shared: Arc::new(Shared::new(callback)) }
    }

    /// Starts a new stage of `total` steps.
    pub fn stage(&self, stage: &str, total: u64, message: &str) -> Result<()> {
        let now = Instant::now();
        *self.shared.stage_start.lock().unwrap() = now;
        self.shared.stages.lock().unwrap().push((stage.to_string(), now));
        self.update(|p| {
            p.stage = stage.to_string();
            p.step = 0;
            p.total = total;
            p.loss = f64::NAN;
            p.eta_seconds = -1.0;
            p.message = message.to_string();
        });
        log::info!("[{stage}] {message}");
        self.check()
    }

    /// Records that `step` of the stage's total is done, with the latest loss.
    pub fn step(&self, step: u64, loss: f64) -> Result<()> {
        let elapsed = self.shared.stage_start.lock().unwrap().elapsed().as_secs_f64();
        let mut log_line = None;
        self.update(|p| {
            p.step = step;
            p.loss = loss;
            p.eta_seconds = if step > 0 && p.total >= step { elapsed / step as f64 * (p.total - step) as f64 } else { -1.0 };
            // A line in the log every tenth of a stage, so runs leave a record of their losses.
            if p.total >= 10 && step > 0 && step * 10 / p.total != (step - 1) * 10 / p.total {
                let loss = if loss.is_finite() { format!(" loss {loss:.4}") } else { String::new() };
                log_line = Some(format!("[{}] {}/{}{} ({:.0} s, ETA {:.0} s)", p.stage, step, p.total, loss, elapsed, p.eta_seconds.max(0.0)));
            }
        });
        if let Some(l) = log_line {
            log::info!("{l}");
        }
        self.check()
    }

    /// A free-text message (shown in logs and GUIs) without changing the step.
    pub fn message(&self, msg: &str) {
        log::info!("{msg}");
        self.update(|p| p.message = msg.to_string());
    }

    /// `Err(Cancelled)` once the caller asked to cancel.
    pub fn check(&self) -> Result<()> {
        if self.shared.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn progress(&self) -> Progress {
        self.shared.progress.lock().unwrap().clone()
    }

    /// Runs `f` as an aside within the current stage, timed under `name` in `stage_seconds`, so
    /// that the stage's own time (and its ETA) leaves it out; the progress shown carries on.
    pub fn aside<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
        let current = self.progress().stage;
        let start = Instant::now();
        self.shared.stages.lock().unwrap().push((name.to_string(), start));
        let out = f();
        let now = Instant::now();
        self.shared.stages.lock().unwrap().push((current, now));
        *self.shared.stage_start.lock().unwrap() += now - start;
        out
    }

    /// How many stages have started so far (a mark for `stage_seconds`).
    pub fn stages_started(&self) -> usize {
        self.shared.stages.lock().unwrap().len()
    }

    /// Wall-clock seconds per stage name over the stages started since the mark `from`, in the
    /// order each name first appeared (a name met again, as in SFR+'s rounds, adds up): each
    /// stage lasts until the next one starts, the last until now.
    pub fn stage_seconds(&self, from: usize) -> Vec<(String, f64)> {
        let stages = self.shared.stages.lock().unwrap();
        let now = Instant::now();
        let mut out: Vec<(String, f64)> = vec![];
        for (i, (name, start)) in stages.iter().enumerate().skip(from) {
            let end = stages.get(i + 1).map(|(_, t)| *t).unwrap_or(now);
            let secs = end.duration_since(*start).as_secs_f64();
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += secs,
                None => out.push((name.clone(), secs)),
            }
        }
        out
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let snapshot = {
            let mut p = self.shared.progress.lock().unwrap();
            f(&mut p);
            p.clone()
        };
        if let Some(cb) = &self.shared.callback {
            cb(&snapshot);
        }
    }
}

impl Shared {
    fn new(callback: Option<Callback>) -> Shared {
        Shared {
            progress: Mutex::new(Progress { loss: f64::NAN, eta_seconds: -1.0, ..Default::default() }),
            cancel: AtomicBool::new(false),
            stage_start: Mutex::new(Instant::now()),
            stages: Mutex::new(vec![]),
            callback,
        }
    }
}

/// A running job producing a `T`.
pub struct Job<T> {
    reporter: Reporter,
    handle: Option<JoinHandle<Result<T>>>,
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on a new thread. A panic inside the work becomes an error, not an abort.
    pub fn spawn<F>(callback: Option<Callback>, work: F) -> Result<Job<T>>
    where
        F: FnOnce(&Reporter) -> Result<T> + Send + 'static,
    {
        let reporter = Reporter::detached(callback);
        let r = reporter.clone();
        let handle = std::thread::Builder::new()
            .name("sfr-job".into())
            .spawn(move || {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&r)))
                    .unwrap_or_else(|p| Err(Error::invalid(format!("internal error: {}", panic_message(&p)))));
                r.update(|p| p.finished = true);
                out
            })
            .map_err(|e| Error::invalid(format!("cannot start a job thread: {e}")))?;
        Ok(Job { reporter, handle: Some(handle) })
    }

    pub fn progress(&self) -> Progress {
        self.reporter.progress()
    }

    /// Asks the work to stop at its next step; idempotent.
    pub fn cancel(&self) {
        self.reporter.shared.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().map(|h| h.is_finished()).unwrap_or(true)
    }

    /// Blocks until the job ends; the result can be taken once.
    pub fn wait(&mut self) -> Result<T> {
        match self.handle.take() {
            None => Err(Error::invalid("the job's result was already taken")),
            Some(h) => h.join().unwrap_or_else(|p| Err(Error::invalid(format!("internal error: {}", panic_message(&p))))),
        }
    }
}

impl<T> Drop for Job<T> {
    /// Dropping a running job cancels it and waits, so no thread outlives its handle.
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.reporter.shared.cancel.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }
}

pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn progress_cancel_and_result() {
        let mut job = Job::spawn(None, |r: &Reporter| {
            r.stage("count", 1_000_000, "counting")?;
            for i in 1..=1_000_000u64 {
                r.step(i, 1.0 / i as f64)?;
                std::thread::sleep(Duration::from_micros(50));
            }
            Ok(42)
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let p = job.progress();
        assert_eq!(p.stage, "count");
        assert!(p.step > 0 && p.step < 1_000_000);
        assert!(p.eta_seconds > 0.0);
        let t = Instant::now();
        job.cancel();
        job.cancel(); // twice is fine
        assert!(matches!(job.wait(), Err(Error::Cancelled)));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(job.wait().is_err(), "result taken once");

        let mut ok = Job::spawn(None, |r: &Reporter| {
            r.stage("s", 2, "")?;
            r.step(2, 0.5)?;
            Ok("done")
        })
        .unwrap();
        assert_eq!(ok.wait().unwrap(), "done");
        assert!(ok.progress().finished);
    }

    #[test]
    fn stage_seconds_add_up_per_name_in_first_seen_order() {
        let r = Reporter::detached(None);
        r.stage("before", 1, "").unwrap();
        let mark = r.stages_started();
        for name in ["load", "finetune", "pseudolabel", "finetune"] {
            r.stage(name, 1, "").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        // An aside inside the last finetune stage: timed apart, the stage's own time without it.
        r.aside("probe", || std::thread::sleep(Duration::from_millis(100)));
        assert_eq!(r.progress().stage, "finetune", "the progress carries on in the stage");
        let s = r.stage_seconds(mark);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["load", "finetune", "pseudolabel", "probe"], "the stage before the mark is left out; a repeated name adds up");
        let finetune = s[1].1;
        assert!((0.035..0.1).contains(&finetune), "two 20 ms stages, without the 100 ms aside: {finetune}");
        assert!(s[3].1 >= 0.1, "{s:?}");
        assert!(s.iter().all(|(_, t)| *t >= 0.015), "{s:?}");
    }

    #[test]
    fn panics_become_errors() {
        let mut job: Job<()> = Job::spawn(None, |_r: &Reporter| panic!("boom")).unwrap();
        let e = job.wait().unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
    }
}
