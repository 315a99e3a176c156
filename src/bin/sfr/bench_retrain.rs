//! `sfr bench --only retrain`: the re-training loop as users wait for it, at `cpu-small` sizes
//! (V-Net with 8 base filters, 2 labelled + 2 unlabelled crops of 32×48×32, 3 classes):
//!
//! * seconds per iteration of `Trainer::step` for each method (the crops are given: this is
//!   the network's cost, not the data loading's);
//! * for the mean teacher, what the teacher adds: its forward on the unlabelled crops plus the
//!   EMA update, beside the student's forward on the whole batch (the target: not more);
//! * under contention: the supervised step while one other CPU-bound process runs (a busy
//!   child of this process), as a ratio to the quiet step, with libtorch's default threads and
//!   with one thread fewer than the cores — what a workstation with other work sees.
use serde_json::{json, Value};
use sfr::pipeline::config::{Method, TrainConfig};
use sfr::pipeline::retrain::{Batch, Trainer};
use sfr::Result;
use std::process::{Child, Command, Stdio};
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

pub fn retrain_bench(reps: usize) -> Result<Value> {
    let cfg = TrainConfig::cpu_small();
    let mut out = serde_json::Map::new();
    out.insert(
        "note".into(),
        json!("cpu-small sizes: V-Net 8 filters, 2 labelled + 2 unlabelled crops 32x48x32, 3 classes; seconds = median of the repetitions after one warm-up, one Trainer::step (forward, losses, backward, SGD, EMA) on given crops"),
    );
    let threads = tch::get_num_threads();
    out.insert("threads".into(), json!(threads));
    let mut quiet = f64::NAN;
    for (name, m) in [("supervised", Method::Supervised), ("self_training", Method::SelfTraining), ("mean_teacher", Method::MeanTeacher), ("acmt", Method::Acmt)] {
        let s = step_seconds(&cfg, m, reps)?;
        if m == Method::Supervised {
            quiet = s;
        }
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

    // Contention: the supervised step beside one busy process, against the quiet one above.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut contention = serde_json::Map::new();
    contention.insert("quiet_seconds".into(), json!(quiet));
    if let Some(busy) = Busy::start() {
        let loaded = step_seconds(&cfg, Method::Supervised, reps)?;
        contention.insert("busy_seconds".into(), json!(loaded));
        contention.insert("busy_vs_quiet".into(), json!(loaded / quiet));
        if cores > 1 {
            tch::set_num_threads((cores - 1) as i32);
            let fewer = step_seconds(&cfg, Method::Supervised, reps)?;
            tch::set_num_threads(threads);
            contention.insert("busy_one_thread_fewer_seconds".into(), json!(fewer));
            contention.insert("busy_one_thread_fewer_vs_quiet".into(), json!(fewer / quiet));
        }
        drop(busy);
    } else {
        contention.insert("busy_seconds".into(), json!({"unavailable": "could not start the busy process"}));
    }
    out.insert("contention".into(), Value::Object(contention));
    Ok(Value::Object(out))
}
