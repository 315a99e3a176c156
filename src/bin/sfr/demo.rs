//! `sfr demo`: the main job on real scans shipped with SFR. On the MSD hippocampus subset in
//! `demo/hippocampus/` (or `--data`, or synthetic phantoms with `--synthetic`) it trains with few
//! labels — supervised (the lower bound), mean teacher, SFR(mean teacher), and SFR+ on request —
//! through the same `sfr::pipeline::train` as `sfr train`, with the same V-Net budget per row,
//! scores every row on held-out test cases never touched in training, prints the table and what
//! it says, and writes the SFR model, an example segmentation and pictures.
use crate::progress::{run_job, ProgressMode};
use clap::Args;
use sfr::io::dataset::{Case, Dataset};
use sfr::io::nifti;
use sfr::io::png::{enlarge, grid_cells, oriented, tile_grid, write_titled_png, View};
use sfr::io::text::Titles;
use sfr::metrics::ClassMetrics;
use sfr::model::SfrModel;
use sfr::nn::autocast;
use sfr::phantom::{write_dataset, PhantomSpec};
use sfr::pipeline::config::{Method, SamStage, TrainConfig};
use sfr::pipeline::data::Sample;
use sfr::pipeline::sam_stage::{SamModule, SamProbe};
use sfr::pipeline::{evaluate_cases, summarize, RunOptions, TrainInputs};
use sfr::stitch::{stitch_image, stitch_labels, StitchLayout, LABEL_PAD};
use sfr::volume::Volume;
use sfr::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the shipped demo data lives, relative to the repository.
const DEMO_DATA: &str = "demo/hippocampus";

/// V-Net iterations per row on real data: half of cpu-small's 600, so that the three default
/// rows fit 10 minutes on a 2-core CPU when it is otherwise idle (docs/experiments/notes.md, "The demo"). With
/// cpu-small's Adam, supervised reached mean Dice 79.6 on the demo's test cases in 300
/// iterations (81.0 in 600).
pub const REAL_ITERATIONS: usize = 300;

/// Canvases per SAM decoder step on real data: 1, where cpu-small takes 2. A step's cost is
/// proportional to its canvases (0.23 s against 0.46 s on 2 cores), and cpu-small's 600 steps
/// of 2 alone would take 275 s of the 10 minutes. Measured on the demo split (pseudo-labels of
/// the 20 unlabelled cases against their true labels, mean Dice, one seed each): 63.2 with
/// batch 1 against 69.0 with 2 on the filled canvas, 64.5 against 62.5 on the V-Net's patch
/// (docs/experiments/notes.md, "Pretrained SAM: LiteMedSAM").
pub const REAL_SAM_BATCH: usize = 1;

#[derive(Args)]
pub struct DemoArgs {
    /// A Decathlon folder to run on [default: the hippocampus subset shipped in demo/hippocampus].
    #[arg(long, conflicts_with = "synthetic")]
    data: Option<PathBuf>,
    /// Synthetic phantoms instead of real scans (easy: little for unlabelled data to add).
    #[arg(long)]
    synthetic: bool,
    /// Output folder (model, example segmentation, pictures, results).
    #[arg(long, default_value = "sfr-demo")]
    out: PathBuf,
    /// Labelled training cases: the first N of dataset.json.
    #[arg(long, default_value_t = 4)]
    labeled: usize,
    /// Unlabelled training cases: the next N (their labels are never read) [default: 20; 12 synthetic].
    #[arg(long)]
    unlabeled: Option<usize>,
    /// Test cases: the last N of dataset.json, never touched in training [default: 12; 8 synthetic].
    #[arg(long)]
    test: Option<usize>,
    /// V-Net iterations, the same for every row [default: 300 real, 300 synthetic].
    #[arg(long)]
    iterations: Option<usize>,
    /// SAM fine-tuning iterations [default: the preset's (600) on real data; 500 synthetic].
    #[arg(long)]
    sam_iterations: Option<usize>,
    /// Canvases a pretrained SAM's frozen encoder encodes once for fine-tuning; 0: LoRA on every
    /// encoder block [default on real data: 0 (cpu-lora, bf16) on a CPU with AVX512-BF16, else
    /// cpu-small's 48].
    #[arg(long)]
    sam_canvases: Option<usize>,
    /// SAM checkpoint for the SFR rows (a file, or a name the library resolves) [default: the
    /// config's choice].
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
    /// Add an SFR+ row (two more SAM fine-tuning rounds and one more V-Net training: past the
    /// 10-minute budget on a 2-core CPU, hence off by default).
    #[arg(long)]
    sfr_plus: bool,
    /// Score SAM's pseudo-labels of the unlabelled cases against their true labels at N points of
    /// the first SFR row's fine-tuning, from step 0 to the last (the curve goes into results.json;
    /// each point costs one pseudo-labelling pass, timed apart from fine-tuning) [default: 0, off].
    #[arg(long, default_value_t = 0)]
    pseudo_label_curve: usize,
    /// libtorch threads; 0 = auto, the cores other work leaves free [default: the config's, 0].
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    progress: ProgressMode,
}

/// The demo's phantoms: 64×64 slices, so that SAM's 16-pixel tokens see each slice as 4×4
/// tokens (with 32×32 slices, 2×2 tokens, a SAM trained from scratch could not even fit its
/// training volumes); 24 slices.
pub fn demo_spec() -> PhantomSpec {
    PhantomSpec { dims: [64, 64, 24], num_classes: 2, noise: 0.35 }
}

/// One row of the table: a method, with or without SAM's pseudo-labels.
#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    method: Method,
    sfr: bool,
    sfr_plus: bool,
}

const ROWS: [Row; 4] = [
    Row { name: "supervised (labels only)", method: Method::Supervised, sfr: false, sfr_plus: false },
    Row { name: "mean teacher", method: Method::MeanTeacher, sfr: false, sfr_plus: false },
    Row { name: "SFR (mean teacher)", method: Method::MeanTeacher, sfr: true, sfr_plus: false },
    Row { name: "SFR+ (mean teacher)", method: Method::MeanTeacher, sfr: true, sfr_plus: true },
];

/// The row whose model the demo writes: SFR (mean teacher), the paper's main configuration.
const SAVED_ROW: usize = 2;

/// The one place where the demo chooses the SAM checkpoint of its SFR rows: `--sam-checkpoint`
/// when given, else whatever the config (the library's preset) chooses. The library resolves
/// what it names (a file, or a known name such as a cached pretrained SAM); a config without a
/// checkpoint starts SAM from random weights, which the library logs loudly.
fn choose_sam_checkpoint(c: &mut TrainConfig, a: &DemoArgs) {
    if let Some(p) = &a.sam_checkpoint {
        c.sam.name_checkpoint(p, false);
    }
}

/// The config of a row on real data: the library's recipe, as `sfr train --preset` uses it,
/// with the demo's V-Net budget and SAM batch. On a CPU that computes in bfloat16
/// (`autocast::cpu_has_bf16`) that is `cpu-lora`, in bf16 there: LoRA on every encoder block,
/// the paper's fine-tuning, fits the 10 minutes there (about 6 of them; pseudo-labels 74.6
/// against 60.5 with the frozen encoder, README "The two commands"). Elsewhere `cpu-small`, whose
/// frozen encoder fits. Only the SAM stage differs; `--sam-canvases` overrides the choice. The
/// consistency ramp-up keeps the preset's shape: its "epoch" is scaled with the iterations, so
/// it ends at the same fraction of training.
fn real_config(a: &DemoArgs, row: Row, iterations: usize) -> TrainConfig {
    // cpu-lora's `sam.bf16: "auto"` is on here, by the same test.
    let mut c = if autocast::cpu_has_bf16() { TrainConfig::cpu_lora() } else { TrainConfig::cpu_small() };
    let base = TrainConfig::cpu_small().vnet;
    c.vnet.iterations = iterations;
    c.vnet.iterations_per_epoch = ((base.iterations_per_epoch * iterations) as f64 / base.iterations as f64).round().max(1.0) as usize;
    if let Some(s) = a.sam_iterations {
        c.sam.iterations = s;
    }
    c.sam.batch = REAL_SAM_BATCH;
    finish_config(&mut c, a, row);
    c
}

/// The config on phantoms: cpu-small's recipe sized for them (patch 64×64×16 stitched as a 4×4
/// grid on SAM's 256 canvas; rot/flip on, phantoms have no left/right meaning).
fn synthetic_config(a: &DemoArgs, row: Row, iterations: usize) -> TrainConfig {
    let mut c = TrainConfig::cpu_small();
    c.preset = "demo-synthetic".into();
    c.patch = [64, 64, 16];
    c.rot_flip = true;
    c.sam.iterations = a.sam_iterations.unwrap_or(500);
    c.vnet.iterations = iterations;
    c.vnet.iterations_per_epoch = (iterations / 20).max(1);
    c.inference.stride = [32, 32, 8];
    finish_config(&mut c, a, row);
    c
}

fn finish_config(c: &mut TrainConfig, a: &DemoArgs, row: Row) {
    c.seed = a.seed;
    if let Some(n) = a.sam_canvases {
        c.sam.frozen_encoder_canvases = n;
    }
    c.method = row.method;
    c.sfr = row.sfr;
    c.sfr_plus.enabled = row.sfr_plus;
    // A demo is not resumed: no checkpoints to write.
    c.checkpoint_every = 0;
    if let Some(t) = a.threads {
        c.threads = t;
    }
    choose_sam_checkpoint(c, a);
}

/// How the SFR rows fine-tuned SAM, for the table's notes. A SAM from random weights trains its
/// whole encoder whatever the config says (`SamModule::frozen_encoder`).
fn sam_stage_words(s: &SamStage, pretrained: bool) -> String {
    let how = if !pretrained {
        format!("the whole SAM from random weights, {} steps of {}", s.iterations, s.batch)
    } else if s.frozen_encoder_canvases > 0 {
        format!("frozen encoder, {} cached canvases, {} decoder steps of {}", s.frozen_encoder_canvases, s.iterations, s.batch)
    } else {
        format!("LoRA r={} on every encoder block, {} steps of {}", s.lora_rank, s.iterations, s.batch)
    };
    if s.bf16.enabled() { format!("{how}, bfloat16 autocast (this CPU computes in bf16)") } else { how }
}

/// The shipped demo data: beside the repository the binary was built in (`target/release/sfr`
/// -> `demo/hippocampus`), an installed `share/sfr/`, or the source tree it was compiled from.
fn default_data() -> Result<PathBuf> {
    let mut candidates = vec![];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("../..").join(DEMO_DATA));
            candidates.push(dir.join("../share/sfr").join(DEMO_DATA));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(DEMO_DATA));
    let found = candidates.iter().find(|c| c.join("dataset.json").is_file());
    // Canonical, so that printed paths read `…/demo/hippocampus`, not `…/release/../../demo`.
    found.map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone())).ok_or_else(|| {
        let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        Error::invalid(format!("the demo data ({DEMO_DATA}/dataset.json) was not found; tried {}; pass --data DIR", tried.join(", ")))
    })
}

fn create_dir(d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))
}

/// Per-class Dice (%) and HD95 (mm) of one row over the test cases.
struct Scores {
    row: Row,
    per_case: Vec<(String, Vec<ClassMetrics>)>,
    train_s: f64,
    sam: serde_json::Value,
    /// The model's `training.stage_seconds`.
    stage_seconds: serde_json::Value,
}

/// One point of the pseudo-label curve: SAM's pseudo-labels of the unlabelled cases after `step`
/// fine-tuning steps, Dice (%) per class (mean over cases) against their true labels.
#[derive(Clone, Debug, serde::Serialize)]
struct CurvePoint {
    step: usize,
    dice: BTreeMap<String, f64>,
    mean_dice: f64,
    seconds: f64,
}

/// The probe that draws the pseudo-label curve: it pseudo-labels every unlabelled volume as the
/// pipeline holds it (normalised, on the training grid) and scores it against `truth`, the
/// case's true label on that same grid (read for this diagnosis only; no row trains on it).
fn curve_probe(points: usize, truth: BTreeMap<String, ndarray::Array3<u8>>, classes: BTreeMap<u16, String>, out: std::sync::Arc<std::sync::Mutex<Vec<CurvePoint>>>) -> SamProbe {
    let call = move |step: usize, sam: &SamModule, cfg: &TrainConfig, unlabeled: &[Sample]| -> Result<()> {
        let t = std::time::Instant::now();
        let mut sums: BTreeMap<u16, f64> = classes.keys().map(|&c| (c, 0.0)).collect();
        for u in unlabeled {
            let truth = truth.get(&u.id).ok_or_else(|| Error::invalid(format!("pseudo-label curve: no true label for {}", u.id)))?;
            if truth.dim() != u.image.dim() {
                return Err(Error::invalid(format!(
                    "pseudo-label curve: {} was resampled for training ({:?} voxels, its label {:?}); the curve needs cases at the training spacing",
                    u.id,
                    u.image.dim(),
                    truth.dim()
                )));
            }
            let pred = sam.pseudo_label(cfg, &u.image, None)?.label;
            for (&c, sum) in sums.iter_mut() {
                *sum += sfr::metrics::class_dice(&pred.view(), &truth.view(), c as u8)?;
            }
        }
        let n = unlabeled.len().max(1) as f64;
        let dice: BTreeMap<String, f64> = sums.iter().map(|(c, s)| (classes[c].clone(), 100.0 * s / n)).collect();
        let mean_dice = dice.values().sum::<f64>() / dice.len().max(1) as f64;
        out.lock().unwrap().push(CurvePoint { step, dice, mean_dice, seconds: t.elapsed().as_secs_f64() });
        Ok(())
    };
    SamProbe { points, call: std::sync::Arc::new(call) }
}

/// Per-class metrics of the pseudo-labels in `dir` (`<id>_pseudo.nii.gz`) against the true labels
/// that `ds` lists for `cases` (the split removed them from the unlabelled cases); cases without
/// a label file, or whose pseudo-label was not written, are left out.
fn score_pseudo_labels(dir: &Path, ds: &Dataset, cases: &[Case], classes: &[u16]) -> Result<Vec<(String, Vec<ClassMetrics>)>> {
    let mut out = vec![];
    for c in cases {
        let pseudo = dir.join(format!("{}_pseudo.nii.gz", c.id));
        let Some(truth) = ds.case(&c.id)?.label.as_ref().filter(|p| p.is_file()) else { continue };
        if !pseudo.exists() {
            continue;
        }
        let pred = nifti::read(&pseudo)?.cast::<u8>();
        let truth = nifti::read(truth)?.cast::<u8>();
        out.push((c.id.clone(), sfr::metrics::evaluate_labels(&pred, &truth, classes)?));
    }
    Ok(out)
}

/// The mean over classes of their mean Dice.
fn mean_dice(summ: &[sfr::pipeline::Summary]) -> f64 {
    summ.iter().map(|x| x.dice_mean).sum::<f64>() / summ.len().max(1) as f64
}

impl Scores {
    /// Mean Dice over classes, per case, in test-case order.
    fn case_mean_dice(&self) -> Vec<f64> {
        self.per_case.iter().map(|(_, m)| m.iter().map(|c| c.dice).sum::<f64>() / m.len().max(1) as f64).collect()
    }
}

/// Paired difference of mean Dice (percentage points) of `a` over `b` across the same test
/// cases: (mean, standard error).
fn paired_gain(a: &Scores, b: &Scores) -> (f64, f64) {
    let d: Vec<f64> = a.case_mean_dice().iter().zip(b.case_mean_dice()).map(|(x, y)| 100.0 * (x - y)).collect();
    let n = d.len() as f64;
    let m = d.iter().sum::<f64>() / n;
    let var = if d.len() > 1 { d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { f64::NAN };
    (m, (var / n).sqrt())
}

/// Differences of mean Dice smaller than this (percentage points) are not called either way,
/// however consistent: with a handful of test cases a tiny but uniform shift has a tiny
/// standard error and would otherwise be announced as a gain.
const MIN_CALLED_POINTS: f64 = 1.0;

/// A sentence on one comparison, by the size of the paired difference against its standard error.
fn verdict(what: &str, (m, se): (f64, f64)) -> String {
    let call = if !se.is_finite() {
        "one test case: no call"
    } else if m > 2.0 * se && m >= MIN_CALLED_POINTS {
        "better on these test cases"
    } else if m < -2.0 * se && m <= -MIN_CALLED_POINTS {
        "worse on these test cases"
    } else {
        "no clear difference (within 2 standard errors, or under 1 point)"
    };
    format!("{what}: {m:+.1} points of mean Dice (paired over test cases, standard error {se:.1}): {call}")
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|h| format!("{h:.2}")).unwrap_or_else(|| "-".into())
}

pub fn run(a: DemoArgs) -> Result<()> {
    create_dir(&a.out)?;
    let (data_dir, unlabeled_n, test_n, iterations) = if a.synthetic {
        let dir = a.out.join("data");
        let (u, t) = (a.unlabeled.unwrap_or(12), a.test.unwrap_or(8));
        let n = a.labeled + u + t;
        let spec = demo_spec();
        eprintln!("== making {n} synthetic phantoms ({:?} voxels, noise, bias field) in {}", spec.dims, dir.display());
        write_dataset(&dir, n, &spec, a.seed)?;
        (dir, u, t, a.iterations.unwrap_or(300))
    } else {
        let dir = match &a.data {
            Some(d) => d.clone(),
            None => default_data()?,
        };
        (dir, a.unlabeled.unwrap_or(20), a.test.unwrap_or(12), a.iterations.unwrap_or(REAL_ITERATIONS))
    };
    let ds = Dataset::open(&data_dir)?;
    let total = ds.training.len();
    if a.labeled == 0 || unlabeled_n == 0 || test_n == 0 {
        return Err(Error::invalid("the demo needs at least one labelled, one unlabelled and one test case"));
    }
    if a.labeled + unlabeled_n + test_n > total {
        return Err(Error::invalid(format!(
            "{}: {} labelled + {unlabeled_n} unlabelled + {test_n} test cases asked for, but dataset.json lists {total}",
            data_dir.display(),
            a.labeled
        )));
    }
    let (labeled, rest) = ds.split_first(a.labeled)?;
    // Unlabelled cases come without their label path (split_first drops it): never read.
    let unlabeled: Vec<Case> = rest[..unlabeled_n].to_vec();
    // The test cases are the last ones of the list, so that they stay the same whatever the
    // other counts; they keep their labels, used only to score.
    let test: Vec<Case> = ds.training[total - test_n..].to_vec();
    if let Some(c) = test.iter().find(|c| c.label.is_none()) {
        return Err(Error::invalid(format!("{}: test case {} has no label to score against", data_dir.display(), c.id)));
    }
    let rows: Vec<Row> = ROWS.iter().copied().filter(|r| !r.sfr_plus || a.sfr_plus).collect();
    let what = if a.synthetic { "synthetic phantoms".to_string() } else { format!("{} ({})", ds.name, data_dir.display()) };
    eprintln!(
        "== {what}: {} labelled ({} ... {}), {} unlabelled, {} test cases; {} rows, {iterations} V-Net iterations each",
        labeled.len(),
        labeled[0].id,
        labeled[labeled.len() - 1].id,
        unlabeled.len(),
        test.len(),
        rows.len()
    );

    let work = a.out.join("work");
    let mut scores: Vec<Scores> = vec![];
    let mut models: Vec<SfrModel> = vec![];
    let mut pseudo_dir: Option<PathBuf> = None;
    let mut sfr_sam: Option<SamStage> = None;
    let classes: BTreeMap<u16, String> = ds.labels.iter().filter(|(&c, _)| c != 0).map(|(&c, n)| (c, n.clone())).collect();
    let curve = std::sync::Arc::new(std::sync::Mutex::new(Vec::<CurvePoint>::new()));
    let demo_start = std::time::Instant::now();
    for (n, &row) in rows.iter().enumerate() {
        let cfg = if a.synthetic { synthetic_config(&a, row, iterations) } else { real_config(&a, row, iterations) };
        eprintln!("== [{}/{}] training: {}", n + 1, rows.len(), row.name);
        // The first SFR row keeps SAM's pseudo-labels on disk, for the picture.
        let opts = if row.sfr && pseudo_dir.is_none() {
            let d = work.join(cfg.method.name());
            pseudo_dir = Some(d.join("pseudo"));
            sfr_sam = Some(cfg.sam.clone());
            let sam_probe = if a.pseudo_label_curve > 0 {
                let mut truth = BTreeMap::new();
                for u in &unlabeled {
                    let path = ds.case(&u.id)?.label.clone().ok_or_else(|| Error::invalid(format!("pseudo-label curve: unlabelled case {} has no label file to score against", u.id)))?;
                    truth.insert(u.id.clone(), nifti::read(&path)?.cast::<u8>().data);
                }
                Some(curve_probe(a.pseudo_label_curve, truth, classes.clone(), curve.clone()))
            } else {
                None
            };
            RunOptions { work_dir: Some(d), write_pseudo_labels: true, sam_probe, ..Default::default() }
        } else {
            RunOptions::default()
        };
        let inputs = TrainInputs {
            labeled: sfr::pipeline::sources(&labeled),
            unlabeled: sfr::pipeline::sources(&unlabeled),
            classes: ds.labels.clone(),
            dataset_name: ds.name.clone(),
        };
        // Training and scoring on the job's thread, so that libtorch runs on one thread of this
        // process at a time: libgomp counts the idle OpenMP threads of every thread that ever ran
        // libtorch, and with more of them than cores it stops spinning at its barriers and
        // sleeps instead. Scoring on the main thread between rows made every later row pay that
        // (the mean-teacher row took 62 s for 100 iterations instead of 37 s alone, 2 cores);
        // a job thread's OpenMP threads end with it.
        let test_cases = test.clone();
        let (model, per_case, train_s) = run_job(a.progress, move |r| {
            let t = std::time::Instant::now();
            let model = sfr::pipeline::train(&cfg, &inputs, &opts, r)?;
            let train_s = t.elapsed().as_secs_f64();
            let per_case = evaluate_cases(&model, &test_cases, None)?;
            Ok((model, per_case, train_s))
        })?;
        let sam = model.meta.training["sam"].clone();
        let stage_seconds = model.meta.training["stage_seconds"].clone();
        scores.push(Scores { row, per_case, train_s, sam, stage_seconds });
        models.push(model);
    }
    let total_s = demo_start.elapsed().as_secs_f64();

    // The table.
    let mut text = String::new();
    text += &format!(
        "{} held-out test cases of {}: Dice (%) mean ± std over cases, HD95 (mm) mean\n",
        test.len(),
        if a.synthetic { "synthetic phantoms".into() } else { ds.name.clone() }
    );
    text += &format!(
        "training: {} labelled + {} unlabelled cases; every row {} V-Net iterations; seed {}\n",
        labeled.len(),
        unlabeled.len(),
        iterations,
        a.seed
    );
    let mut header = format!("{:<26}", "method");
    for name in classes.values() {
        header += &format!(" {:>16}", format!("{name} Dice"));
    }
    header += &format!(" {:>10}", "mean Dice");
    for name in classes.values() {
        header += &format!(" {:>14}", format!("{name} HD95"));
    }
    header += &format!(" {:>8}\n", "train s");
    text += &header;
    let mut json_rows = vec![];
    for s in &scores {
        let rows: Vec<Vec<ClassMetrics>> = s.per_case.iter().map(|(_, m)| m.clone()).collect();
        let summ = summarize(&rows, &ds.labels);
        let mean_dice = mean_dice(&summ);
        let mut line = format!("{:<26}", s.row.name);
        for x in &summ {
            line += &format!(" {:>16}", format!("{:.2} ± {:.2}", 100.0 * x.dice_mean, 100.0 * x.dice_std));
        }
        line += &format!(" {:>10.2}", 100.0 * mean_dice);
        for x in &summ {
            line += &format!(" {:>14}", fmt_opt(x.hd95_mean));
        }
        line += &format!(" {:>8.0}\n", s.train_s);
        text += &line;
        json_rows.push(serde_json::json!({
            "name": s.row.name, "method": s.row.method.name(), "sfr": s.row.sfr, "sfr_plus": s.row.sfr_plus,
            "mean_dice": mean_dice, "classes": summ, "train_seconds": s.train_s, "stage_seconds": s.stage_seconds, "sam": s.sam,
            "per_case": s.per_case.iter().map(|(id, m)| serde_json::json!({"id": id, "metrics": m})).collect::<Vec<_>>(),
        }));
    }
    // What the table says, from the numbers as measured.
    let mut meaning = vec![];
    let sup = &scores[0];
    for s in &scores[1..] {
        meaning.push(verdict(&format!("{} vs supervised", s.row.name), paired_gain(s, sup)));
    }
    if let (Some(mt), Some(sfr)) = (scores.iter().find(|s| s.row.method == Method::MeanTeacher && !s.row.sfr), scores.iter().find(|s| s.row.sfr && !s.row.sfr_plus)) {
        meaning.push(verdict("SFR (mean teacher) vs mean teacher alone", paired_gain(sfr, mt)));
    }
    for (s, m) in scores.iter().zip(&models) {
        // A row whose model failed the training check (a class never or barely predicted on its
        // labelled cases): said in the table's notes, as `sfr train` says it.
        if let Some(w) = sfr::pipeline::class_check::ClassCheck::from_training(&m.meta.training).and_then(|c| c.warning()) {
            meaning.push(format!("WARNING: {}: {w}", s.row.name));
        }
    }
    for s in &scores {
        // A row that segments nothing scores 0 everywhere: say so, it reads differently from a
        // poor segmentation.
        if s.per_case.iter().all(|(_, m)| m.iter().all(|c| c.pred_voxels == 0)) {
            meaning.push(format!("{}: predicted no foreground on any test case (background only)", s.row.name));
        }
    }
    // The SAM stage's own quality: its pseudo-labels against the unlabelled cases' true labels,
    // which no row trains on (the dataset has them; they are read only here, after training).
    let pseudo_scores = match &pseudo_dir {
        Some(d) => score_pseudo_labels(d, &ds, &unlabeled, &classes.keys().copied().collect::<Vec<_>>())?,
        None => vec![],
    };
    if !pseudo_scores.is_empty() {
        let rows: Vec<Vec<ClassMetrics>> = pseudo_scores.iter().map(|(_, m)| m.clone()).collect();
        let summ = summarize(&rows, &ds.labels);
        let per_class: Vec<String> = summ.iter().map(|x| format!("{} {:.1} ± {:.1}", x.name, 100.0 * x.dice_mean, 100.0 * x.dice_std)).collect();
        let mean = 100.0 * mean_dice(&summ);
        // The row that wrote the pseudo-labels: the first SFR row.
        let kept = match scores.iter().position(|s| s.row.sfr).and_then(|i| crate::guard_counts(&models[i].meta)) {
            Some((k, d)) => format!("; the pseudo-label guard let {k} of {} train the V-Net", k + d),
            None => String::new(),
        };
        meaning.push(format!(
            "SAM's pseudo-labels of the {} unlabelled cases against their true labels (read after training, never trained on): Dice (%) {}, mean {mean:.1}{kept}",
            pseudo_scores.len(),
            per_class.join(", ")
        ));
    }
    if let Some(s) = scores.iter().find(|s| s.row.sfr) {
        let ck = &s.sam["checkpoint"];
        let conf = s.sam["mean_confidence"].as_f64().map(|c| format!(", mean pseudo-label confidence {c:.3}")).unwrap_or_default();
        let stage = sfr_sam.as_ref().map(|c| format!("; fine-tuning: {}", sam_stage_words(c, !ck.is_null()))).unwrap_or_default();
        meaning.push(format!(
            "SAM in the SFR rows: variant {}, {}{conf}{stage}",
            s.sam["variant"].as_str().unwrap_or("?"),
            if ck.is_null() { "no checkpoint (random initial weights: not pretrained)".to_string() } else { format!("checkpoint {}", ck.as_str().unwrap_or("?")) }
        ));
    }
    let curve = curve.lock().unwrap().clone();
    if let (Some(first), Some(last)) = (curve.first(), curve.last()) {
        meaning.push(format!(
            "SAM's pseudo-labels along its fine-tuning ({} points): mean Dice {:.1} at step {}, {:.1} at step {}; each point took {:.0} s (timed apart)",
            curve.len(),
            first.mean_dice,
            first.step,
            last.mean_dice,
            last.step,
            curve.iter().map(|p| p.seconds).sum::<f64>() / curve.len() as f64
        ));
    }
    meaning.push(format!(
        "{} test cases are few: differences within about 2 standard errors are noise; one run, one seed.",
        test.len()
    ));
    println!();
    print!("{text}");
    println!();
    for m in &meaning {
        println!("- {m}");
    }

    // The SFR model and an example segmentation to open in 3D Slicer.
    let saved = SAVED_ROW.min(models.len() - 1);
    let model = &models[saved];
    let model_path = a.out.join("sfr_mean_teacher.sfrmodel");
    model.save(&model_path)?;
    let example = &test[0];
    let img = nifti::read(&example.image)?.cast::<f32>();
    let truth = nifti::read(example.label.as_ref().expect("test cases have labels"))?.cast::<u8>();
    let mut preds = vec![];
    for m in &models {
        preds.push(m.segment(&img, None)?.0);
    }
    let seg_path = a.out.join(format!("{}_sfr_segmentation.nii.gz", example.id));
    nifti::write(&seg_path, &preds[saved])?;

    // Pictures.
    let pic_dir = a.out.join("pictures");
    create_dir(&pic_dir)?;
    let views_png = pic_dir.join(format!("{}_views.png", example.id));
    let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
    write_views_png(&views_png, &example.id, &img, &truth, &names, &preds)?;
    let pseudo_png = match (&pseudo_dir, unlabeled.first()) {
        (Some(d), Some(u)) => {
            let p = pic_dir.join(format!("{}_sam_pseudo_label.png", u.id));
            let uimg = nifti::read(&u.image)?.cast::<f32>();
            let ulab = nifti::read(d.join(format!("{}_pseudo.nii.gz", u.id)))?.cast::<u8>();
            write_stitched_png(&p, &u.id, &uimg, &ulab)?;
            Some((u.id.clone(), p))
        }
        _ => None,
    };

    let results = serde_json::json!({
        "data": data_dir.display().to_string(),
        "dataset": ds.name,
        "synthetic": a.synthetic,
        "labeled": labeled.iter().map(|c| &c.id).collect::<Vec<_>>(),
        "unlabeled": unlabeled.iter().map(|c| &c.id).collect::<Vec<_>>(),
        "test": test.iter().map(|c| &c.id).collect::<Vec<_>>(),
        "vnet_iterations": iterations,
        "seed": a.seed,
        "total_seconds": total_s,
        // What the times were measured on: the SAM path and its speed depend on the CPU class.
        "machine": {
            "cpu_model": crate::bench::cpu_model(),
            "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "avx512_bf16": autocast::cpu_has_bf16(),
        },
        "rows": json_rows,
        "pseudo_label_curve": curve,
        "pseudo_labels": pseudo_scores.iter().map(|(id, m)| serde_json::json!({"id": id, "metrics": m})).collect::<Vec<_>>(),
        "meaning": meaning,
        "saved_model": {"row": rows[saved].name, "path": model_path.display().to_string()},
        "example_segmentation": seg_path.display().to_string(),
        "pictures": {
            "views": views_png.display().to_string(),
            "sam_pseudo_label": pseudo_png.as_ref().map(|(_, p)| p.display().to_string()),
        },
    });
    let results_json = a.out.join("results.json");
    let body = serde_json::to_string_pretty(&results).map_err(|e| Error::invalid(e.to_string()))?;
    std::fs::write(&results_json, body + "\n").map_err(|e| Error::io(&results_json, e))?;
    let results_txt = a.out.join("results.txt");
    std::fs::write(&results_txt, format!("{text}\n{}\n", meaning.iter().map(|m| format!("- {m}")).collect::<Vec<_>>().join("\n")))
        .map_err(|e| Error::io(&results_txt, e))?;

    println!();
    println!("whole demo: {total_s:.0} s of training and scoring");
    println!("results:      {} (table), {} (per case)", results_txt.display(), results_json.display());
    println!("model:        {} ({} row; open with SFR's 3D Slicer module or `sfr segment`)", model_path.display(), rows[saved].name);
    println!("example:      {} -> {} (open both in 3D Slicer)", example.image.display(), seg_path.display());
    println!(
        "picture:      {} — test case {}: rows axial, coronal, sagittal (as 3D Slicer shows them); columns image, truth (the expert label), {}",
        views_png.display(),
        example.id,
        names.join(", ")
    );
    if let Some((id, p)) = &pseudo_png {
        println!("picture:      {} — unlabelled case {id}, axial slices stitched, SAM's pseudo-label overlaid", p.display());
    }
    println!("colours:      {}", class_legend(&classes));
    Ok(())
}

fn class_legend(classes: &BTreeMap<u16, String>) -> String {
    const NAMES: [&str; 4] = ["red", "green", "yellow", "blue"];
    classes
        .iter()
        .map(|(&c, n)| format!("{} = {n}", NAMES.get((c as usize - 1) % sfr::io::png::CLASS_COLOURS.len()).copied().unwrap_or("other")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whole-number enlargement so that a slice of `h × w` pixels is about 200 pixels across,
/// keeping the pixel aspect of `spacing` (rows, columns).
fn zoom_for(h: usize, w: usize, spacing: [f64; 2]) -> (usize, usize) {
    let base = (200 / h.max(w).max(1)).clamp(1, 8) as f64;
    let min = spacing[0].min(spacing[1]);
    (((base * spacing[0] / min).round() as usize).max(1), ((base * spacing[1] / min).round() as usize).max(1))
}

/// Index (along a view's normal) of the slice through the centre of the foreground of `label`,
/// or the middle slice when there is none.
fn centre_slice(label: &ndarray::Array3<u8>) -> usize {
    let (mut sum, mut n) = (0usize, 0usize);
    for ((k, _, _), &v) in label.indexed_iter() {
        if v != 0 && v != LABEL_PAD {
            sum += k;
            n += 1;
        }
    }
    if n == 0 {
        label.shape()[0] / 2
    } else {
        (sum as f64 / n as f64).round() as usize
    }
}

/// Column titles of the views picture: the image, the ground truth, then one per method.
fn view_columns<'a>(methods: &[&'a str]) -> Vec<&'a str> {
    ["image", "truth"].into_iter().chain(methods.iter().copied()).collect()
}

/// One test case as a grid: rows axial, coronal, sagittal through the centre of the ground
/// truth; columns the image, the ground truth, and each method's prediction, overlaid; titled.
fn write_views_png(path: &Path, case: &str, img: &Volume<f32>, truth: &Volume<u8>, methods: &[&str], preds: &[Volume<u8>]) -> Result<()> {
    if methods.len() != preds.len() {
        return Err(Error::invalid(format!("{}: {} method names for {} predictions", path.display(), methods.len(), preds.len())));
    }
    let mut image_tiles = vec![];
    let mut label_tiles = vec![];
    for view in View::ALL {
        let (im, sp) = oriented(&img.data.view(), &img.geometry, view);
        let (gt, _) = oriented(&truth.data.view(), &truth.geometry, view);
        let n = centre_slice(&gt);
        let (h, w) = (im.shape()[1], im.shape()[2]);
        let (zr, zc) = zoom_for(h, w, [sp[1], sp[2]]);
        let slice_im = enlarge(&im.index_axis(ndarray::Axis(0), n), zr, zc);
        let mut labs = vec![ndarray::Array2::<u8>::zeros((h, w))];
        labs.push(gt.index_axis(ndarray::Axis(0), n).to_owned());
        for p in preds {
            labs.push(oriented(&p.data.view(), &p.geometry, view).0.index_axis(ndarray::Axis(0), n).to_owned());
        }
        image_tiles.push(vec![slice_im; labs.len()]);
        label_tiles.push(labs.iter().map(|l| enlarge(&l.view(), zr, zc)).collect::<Vec<_>>());
    }
    const GAP: usize = 4;
    let image = tile_grid(&image_tiles, GAP, 0.0f32);
    let label = tile_grid(&label_tiles, GAP, LABEL_PAD);
    let (row_cells, col_cells) = grid_cells(&label_tiles, GAP);
    let titles = Titles {
        title: Some(format!("test case {case}")),
        columns: col_cells.into_iter().zip(view_columns(methods)).map(|(c, t)| (c, t.to_string())).collect(),
        rows: row_cells.into_iter().zip(View::ALL).map(|(r, v)| (r, v.name().to_string())).collect(),
    };
    write_titled_png(path, &image.view(), Some(&label.view()), &titles)
}

/// An unlabelled case's axial slices (as a viewer shows them) stitched on the smallest square
/// canvas that holds them all, with SAM's pseudo-label overlaid; titled.
fn write_stitched_png(path: &Path, case: &str, img: &Volume<f32>, label: &Volume<u8>) -> Result<()> {
    if img.dims() != label.dims() {
        return Err(Error::invalid(format!("{}: pseudo-label dims {:?} differ from the image's {:?}", path.display(), label.dims(), img.dims())));
    }
    let (im, sp) = oriented(&img.data.view(), &img.geometry, View::Axial);
    let (lab, _) = oriented(&label.data.view(), &label.geometry, View::Axial);
    let [d, h, w] = [im.shape()[0], im.shape()[1], im.shape()[2]];
    let mut canvas = 64;
    while canvas < 4096 && StitchLayout::max_slices(h, w, canvas).map_or(true, |m| m < d) {
        canvas += 64;
    }
    let layout = StitchLayout::for_shape(im.shape(), canvas)?;
    let ci = stitch_image(&im.view(), &layout)?;
    let cl = stitch_labels(&lab.view(), &layout)?;
    // About 800 pixels across, keeping the pixel aspect.
    let base = (800 / canvas).clamp(1, 8) as f64;
    let min = sp[1].min(sp[2]);
    let (zr, zc) = (((base * sp[1] / min).round() as usize).max(1), ((base * sp[2] / min).round() as usize).max(1));
    let titles = Titles { title: Some(format!("SAM pseudo-label of {case}, stitched canvas")), ..Titles::default() };
    write_titled_png(path, &enlarge(&ci.view(), zr, zc).view(), Some(&enlarge(&cl.view(), zr, zc).view()), &titles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(dice: &[f64]) -> Scores {
        let per_case = dice
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let m = ClassMetrics { class: 1, dice: d, jaccard: 0.0, asd: None, assd: None, hd: None, hd95: None, pred_voxels: 1, ref_voxels: 1 };
                (format!("c{i}"), vec![m])
            })
            .collect();
        Scores { row: ROWS[0], per_case, train_s: 0.0, sam: serde_json::Value::Null, stage_seconds: serde_json::Value::Null }
    }

    #[test]
    fn gains_are_paired_and_called_only_when_clear() {
        let base = scores(&[0.50, 0.60, 0.70, 0.80]);
        // +5 points on every case but one (+3): mean +4.5, small standard error -> better.
        let up = scores(&[0.55, 0.65, 0.75, 0.83]);
        let (m, se) = paired_gain(&up, &base);
        assert!((m - 4.5).abs() < 1e-9 && se > 0.0 && se < 1.0, "{m} {se}");
        assert!(verdict("x", (m, se)).ends_with("better on these test cases"));
        assert!(verdict("x", paired_gain(&base, &up)).ends_with("worse on these test cases"));
        // Large swings either way: within noise.
        let noisy = scores(&[0.90, 0.30, 0.95, 0.55]);
        assert!(verdict("x", paired_gain(&noisy, &base)).contains("no clear difference"));
        // A tiny uniform shift has a tiny standard error but is not announced.
        let tiny = scores(&[0.502, 0.602, 0.702, 0.802]);
        assert!(verdict("x", paired_gain(&tiny, &base)).contains("no clear difference"));
        assert!(verdict("x", paired_gain(&scores(&[0.9]), &scores(&[0.1]))).contains("no call"));
    }

    #[test]
    fn pictures_carry_titles_in_bands_around_the_slices() {
        use sfr::io::text::{BAND, GLYPH, LINE, MARGIN};
        use sfr::volume::Geometry;
        let dir = tempfile::tempdir().unwrap();
        let img = Volume::new(ndarray::Array3::from_shape_fn((6, 8, 10), |(k, j, i)| (k + j + i) as f32 + 1.0), Geometry::default());
        let mut lab = ndarray::Array3::<u8>::zeros((6, 8, 10));
        lab.slice_mut(ndarray::s![2..4, 3..6, 4..7]).fill(1);
        let truth = Volume::new(lab, Geometry::default());
        let decode = |p: &Path| {
            let mut r = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap())).read_info().unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            (info.width as usize, info.height as usize, buf[..3].to_vec())
        };
        let methods = [ROWS[0].name, ROWS[2].name];
        let path = dir.path().join("views.png");
        write_views_png(&path, "case_1", &img, &truth, &methods, &[truth.clone(), truth.clone()]).unwrap();
        let (w, h, corner) = decode(&path);
        assert_eq!(corner, BAND);
        // Slices enlarged 8 times (the most): four columns as wide as the axial slice's 10
        // voxels, rows of the axial (8 voxels), coronal and sagittal (6) slices, 4-pixel gaps;
        // the left band as wide as "sagittal"; above, the title and the column titles
        // ("supervised (labels only)" takes 5 lines of 5 characters in 80 pixels).
        assert_eq!(view_columns(&methods), ["image", "truth", "supervised (labels only)", "SFR (mean teacher)"]);
        assert_eq!(w, 8 * GLYPH + 2 * MARGIN + 4 * 80 + 5 * 4);
        assert_eq!(h, 2 * MARGIN + (1 + 5) * LINE + (8 + 6 + 6) * 8 + 4 * 4);
        assert!(write_views_png(&path, "case_1", &img, &truth, &methods[..1], &[truth.clone(), truth.clone()]).is_err());
        let path = dir.path().join("stitched.png");
        write_stitched_png(&path, "case_2", &img, &truth).unwrap();
        let (w, h, corner) = decode(&path);
        assert_eq!(corner, BAND);
        // A square canvas (512 pixels: 64 enlarged 8 times) under the title, on two lines of at
        // most 31 characters.
        assert_eq!((w, h - w), (512, 2 * MARGIN + 2 * LINE));
    }

    #[test]
    fn centre_slice_follows_the_foreground() {
        let mut l = ndarray::Array3::<u8>::zeros((10, 4, 4));
        assert_eq!(centre_slice(&l), 5, "no foreground: the middle");
        l[[2, 0, 0]] = 1;
        l[[4, 1, 1]] = 2;
        l[[9, 0, 0]] = LABEL_PAD; // padding is not foreground
        assert_eq!(centre_slice(&l), 3);
        assert_eq!(zoom_for(50, 40, [1.0, 1.0]), (4, 4));
        assert_eq!(zoom_for(50, 40, [2.0, 1.0]), (8, 4), "pixel aspect kept");
        assert_eq!(zoom_for(1000, 10, [1.0, 1.0]), (1, 1));
    }
}
