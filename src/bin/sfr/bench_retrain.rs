//! `sfr bench --only retrain`: the re-training loop as users wait for it, at `cpu-small` sizes
//! (V-Net with 8 base filters, 2 labelled + 2 unlabelled crops of 32×48×32, 3 classes):
//!
//! * seconds per iteration of `Trainer::step` for each method (the crops are given: this is
//!   the network's cost, not the data loading's);
//! * for the mean teacher, what the teacher adds: its forward on the unlabelled crops plus the
//!   EMA update, beside the student's forward on the whole batch (the target: not more);
//! * under contention (`contention`, also alone as `--only contention`): the supervised step
//!   quiet and while one other CPU-bound process runs (a busy child of this process), with
//!   libtorch's default threads, with one thread, and with auto threads (`threads: 0`, see
//!   `sfr::threads`) — what a workstation with other work sees.
use serde_json::{json, Value};
use sfr::pipeline::config::{Method, TrainConfig};
use sfr::pipeline::retrain::{Batch, Trainer};
use sfr::Result;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Set in the environment of the busy child: it spins until killed.
pub const BUSY_ENV: &str = "SFR_BENCH_BUSY";

/// The body of the busy child (never returns).
pub fn busy_main() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

struct Busy(Child);

impl Busy {
    fn start() -> Option<Busy> {
        let exe = std::env::current_exe().ok()?;
        Command::new(exe).arg("bench").env(BUSY_ENV, "1").stdout(Stdio::null()).spawn().ok().map(Busy)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn batch(cfg: &TrainConfig, classes: i64) -> Batch {
    let [z, y, x] = cfg.patch_zyx().map(|v| v as i64);
    let (lb, ub) = (cfg.vnet.labeled_batch as i64, cfg.vnet.unlabeled_batch as i64);
    tch::manual_seed(0);
    Batch {
        images: Tensor::randn([lb + ub, 1, z, y, x], (Kind::Float, Device::Cpu)),
        labels: Tensor::randint(classes, [lb, z, y, x], (Kind::Int64, Device::Cpu)),
        sam_pseudo: None,
        own_pseudo: None,
    }
}

/// [`super::time`] (median of `reps` runs after a warm-up) for a step that can fail.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut failed = None;
    let seconds = super::time(reps, || {
        if failed.is_none() {
            failed = f().err();
        }
    });
    failed.map_or(Ok(seconds), Err)
}

fn step_seconds(cfg: &TrainConfig, method: Method, reps: usize) -> Result<f64> {
    let mut cfg = cfg.clone();
    cfg.method = method;
    let mut trainer = Trainer::new(&cfg, 3, Device::Cpu)?;
    let b = batch(&cfg, 3);
    let mut it = 0;
    time(reps, || {
        trainer.step(&b, it)?;
        it += 1;
        Ok(())
    })
}

/// The contention cases alone (`--only contention`).
pub fn contention_only(reps: usize) -> Result<Value> {
    Ok(json!({ "contention": contention_bench(&TrainConfig::cpu_small(), reps)? }))
}

pub fn retrain_bench(reps: usize) -> Result<Value> {
    let cfg = TrainConfig::cpu_small();
    let mut out = serde_json::Map::new();
    out.insert(
        "note".into(),
        json!("cpu-small sizes: V-Net 8 filters, 2 labelled + 2 unlabelled crops 32x48x32, 3 classes; seconds = median of the repetitions after one warm-up, one Trainer::step (forward, losses, backward, SGD, EMA) on given crops"),
    );
    let threads = tch::get_num_threads();
    out.insert("threads".into(), json!(threads));
    for (name, m) in [("supervised", Method::Supervised), ("self_training", Method::SelfTraining), ("mean_teacher", Method::MeanTeacher), ("acmt", Method::Acmt)] {
        let s = step_seconds(&cfg, m, reps)?;
        out.insert(format!("{name}_seconds_per_iteration"), json!(s));
        out.insert(format!("{name}_iterations_per_second"), json!(1.0 / s));
    }

    // What the teacher adds, beside the student's forward (same batch, training mode).
    let mut mt_cfg = cfg.clone();
    mt_cfg.method = Method::MeanTeacher;
    let trainer = Trainer::new(&mt_cfg, 3, Device::Cpu)?;
    let b = batch(&mt_cfg, 3);
    let lb = mt_cfg.vnet.labeled_batch as i64;
    let unl = b.images.narrow(0, lb, b.images.size()[0] - lb);
    let student_forward = time(reps, || {
        let _ = trainer.net.f_forward_t(&b.images, true)?;
        Ok(())
    })?;
    let teacher = trainer.method.teacher().expect("the mean teacher has a teacher");
    let teacher_forward = time(reps, || {
        let _ = tch::no_grad(|| teacher.f_forward_t(&unl, true))?;
        Ok(())
    })?;
    let mut method = sfr::ssl::build(Method::MeanTeacher, &trainer.net, &mt_cfg.vnet, Device::Cpu)?;
    let mut it = 0;
    let ema = time(reps, || {
        it += 1;
        method.after_step(&trainer.net, it)
    })?;
    out.insert(
        "mean_teacher_cost".into(),
        json!({
            "student_forward_seconds": student_forward,
            "teacher_forward_seconds": teacher_forward,
            "ema_update_seconds": ema,
            "teacher_vs_student_forward": (teacher_forward + ema) / student_forward,
        }),
    );

    out.insert("contention".into(), contention_bench(&cfg, reps)?);
    Ok(Value::Object(out))
}


/// How long each phase (quiet, busy) runs steps before it is timed: covers the busy child's
/// start (it loads libtorch) and gives auto mode several load readings (`sfr::threads::INTERVAL`).
const SETTLE: Duration = Duration::from_secs(2);

/// The modes compared: libtorch's default threads fixed, one thread fixed, and auto
/// (`threads: 0`), as the `threads` values `sfr::threads::configure` takes.
fn modes() -> [(&'static str, usize); 3] {
    [("fixed_default", sfr::threads::default_threads()), ("fixed_1", 1), ("auto", 0)]
}

/// One phase: supervised steps with the modes interleaved step by step (the order rotating
/// every round), so that other work on the machine, which comes and goes, weighs on every mode
/// alike. Each step is preceded by `threads::tick` as in `pipeline::retrain`. Returns per mode
/// the median seconds of `reps` timed steps (after `SETTLE` of untimed rounds) and, for auto,
/// how many of its timed steps ran with each thread count.
fn interleaved_phase(trainer: &mut Trainer, b: &Batch, reps: usize) -> Result<(Vec<f64>, BTreeMap<usize, usize>)> {
    let modes = modes();
    let mut it = 0;
    let mut step = |threads: usize| -> Result<(f64, usize)> {
        sfr::threads::configure(threads); // applies a fixed count, or auto's last decision
        let t = Instant::now();
        let used = sfr::threads::tick();
        trainer.step(b, it)?;
        it += 1;
        Ok((t.elapsed().as_secs_f64(), used))
    };
    let start = Instant::now();
    while start.elapsed() < SETTLE {
        for &(_, threads) in &modes {
            step(threads)?;
        }
    }
    let mut times = vec![Vec::with_capacity(reps); modes.len()];
    let mut auto_threads = BTreeMap::new();
    for round in 0..reps.max(1) {
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let (seconds, used) = step(modes[m].1)?;
            times[m].push(seconds);
            if modes[m].1 == 0 {
                *auto_threads.entry(used).or_insert(0) += 1;
            }
        }
    }
    let medians = times.into_iter().map(|t| super::models::median(t).unwrap_or(f64::NAN)).collect();
    Ok((medians, auto_threads))
}

/// The supervised step quiet and beside one busy process (a child spinning on one core), in
/// the three `modes`, interleaved (see `interleaved_phase`).
fn contention_bench(cfg: &TrainConfig, reps: usize) -> Result<Value> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let before = tch::get_num_threads();
    let mut cfg = cfg.clone();
    cfg.method = Method::Supervised;
    let mut trainer = Trainer::new(&cfg, 3, Device::Cpu)?;
    let b = batch(&cfg, 3);
    let (quiet, quiet_auto) = interleaved_phase(&mut trainer, &b, reps)?;
    let quiet_others = sfr::threads::auto_state().1;
    let busy = match Busy::start() {
        Some(child) => {
            let r = interleaved_phase(&mut trainer, &b, reps)?;
            drop(child);
            Some((r, sfr::threads::auto_state().1))
        }
        None => None,
    };
    // Back to what the sections after this one expect.
    sfr::threads::configure(0);
    tch::set_num_threads(before);

    let by_mode = |v: &[f64]| -> Value { modes().iter().zip(v).map(|((name, _), s)| (name.to_string(), json!(s))).collect::<serde_json::Map<_, _>>().into() };
    let counts = |m: &BTreeMap<usize, usize>| -> Value { m.iter().map(|(t, n)| (t.to_string(), json!(n))).collect::<serde_json::Map<_, _>>().into() };
    let mut out = json!({
        "note": "supervised Trainer::step at cpu-small sizes, the three modes interleaved step by step (order rotating), \
                 each step preceded by threads::tick as in the training loop; seconds = median of the repetitions after \
                 2 s of untimed rounds. Modes: fixed_default = libtorch's default threads, fixed_1 = one thread, \
                 auto = threads 0 (the cores other work leaves free, re-read every 0.5 s). busy = while a child process \
                 spins on one core. busy_vs_quiet = busy seconds of the mode / quiet seconds of fixed_default \
                 (the machine's best quiet time). auto.steps_by_threads = how many timed auto steps ran with each \
                 thread count; auto.others_cores = the cores other work took at auto's last reading of the phase.",
        "cores": cores,
        "libtorch_default_threads": sfr::threads::default_threads(),
        "quiet_seconds": by_mode(&quiet),
        "auto": { "quiet": { "steps_by_threads": counts(&quiet_auto), "others_cores": quiet_others } },
    });
    match busy {
        Some(((busy, busy_auto), others)) => {
            out["busy_seconds"] = by_mode(&busy);
            out["busy_vs_quiet"] = by_mode(&busy.iter().map(|b| b / quiet[0]).collect::<Vec<_>>());
            out["auto"]["busy"] = json!({ "steps_by_threads": counts(&busy_auto), "others_cores": others });
        }
        None => out["busy_seconds"] = json!({ "unavailable": "could not start the busy process" }),
    }
    Ok(out)
}
