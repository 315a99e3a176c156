//! Running a library job from the command line: a progress bar for people (indicatif) or one
//! JSON event per line for programs (`--progress json`), and Ctrl-C as cancellation.
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use sfr::job::{Job, Progress, Reporter};
use sfr::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar per stage with step, loss and ETA.
    Bar,
    /// One JSON object per line on stdout: {"stage", "step", "total", "loss", "eta_seconds", "message"}.
    Json,
    /// Nothing but the log.
    None,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler once; the first Ctrl-C cancels the job, a second one exits.
fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "\ninterrupted: nothing was written");
                // `_exit`, not `exit`: `exit` runs libtorch's static destructors and atexit
                // handlers while the job thread is still inside libtorch, which then panics
                // or aborts with a message. Every output is written to a temporary file and
                // renamed, so stopping here leaves no partial file (at most a hidden temporary).
                unsafe { libc::_exit(130) };
            }
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "\ncancelling (Ctrl-C again to quit at once)...");
        });
    });
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Runs `work` as a job, showing its progress, until it ends or the user cancels.
pub fn run_job<T: Send + 'static>(mode: ProgressMode, work: impl FnOnce(&Reporter) -> Result<T> + Send + 'static) -> Result<T> {
    install_ctrlc();
    let json_lines = mode == ProgressMode::Json;
    let last_json = Arc::new(std::sync::Mutex::new(Progress::default()));
    let lj = last_json.clone();
    let callback: Option<Box<dyn Fn(&Progress) + Send + Sync>> = if json_lines {
        Some(Box::new(move |p: &Progress| {
            // Throttle to changes of stage/message or every step; cheap enough either way.
            let mut last = lj.lock().unwrap();
            if p.stage != last.stage || p.step != last.step || p.message != last.message || p.finished != last.finished {
                let loss = if p.loss.is_finite() { serde_json::json!(p.loss) } else { serde_json::Value::Null };
                let eta = if p.eta_seconds >= 0.0 { serde_json::json!(p.eta_seconds) } else { serde_json::Value::Null };
                // A reader that went away or a full disk must not kill the job (println! panics).
                use std::io::Write as _;
                let line = serde_json::json!({"stage": p.stage, "step": p.step, "total": p.total, "loss": loss, "eta_seconds": eta, "message": p.message, "finished": p.finished});
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{line}").and_then(|_| o.flush());
                *last = p.clone();
            }
        }))
    } else {
        None
    };
    let mut job = Job::spawn(callback, work)?;
    let bar = (mode == ProgressMode::Bar).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(bar_style());
        b
    });
    let mut stage = String::new();
    let mut cancelled = false;
    while !job.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if INTERRUPTED.load(Ordering::SeqCst) && !cancelled {
            job.cancel();
            cancelled = true;
        }
        if let Some(b) = &bar {
            let p = job.progress();
            if p.stage != stage {
                if !stage.is_empty() {
                    b.finish();
                    b.reset();
                }
                stage = p.stage.clone();
                b.set_prefix(stage.clone());
                b.set_length(p.total.max(1));
            }
            b.set_position(p.step);
            b.set_message(if p.loss.is_finite() { format!("loss {:.4}", p.loss) } else { String::new() });
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    job.wait()
}
