//! `sfr`: the command-line tool. Thin: parses arguments, calls the library, prints results.

/// A line of results on stdout. A failed write (full disk) is an error of the command; a
/// closed pipe (`sfr info M | head -0`) ends the program quietly in `main`. (`println!` would
/// panic on either.)
macro_rules! out {
    ($($arg:tt)*) => { crate::write_stdout(format_args!($($arg)*))? };
}

/// A line for people on stderr; a closed or full stderr is not worth failing (or panicking) for.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod demo;
mod manifest;
mod progress;

use clap::{Args, Parser, Subcommand};
use progress::{run_job, ProgressMode};
use serde_json::json;
use sfr::io::dataset::{read_id_list, Dataset};
use sfr::io::nifti;
use sfr::model::SfrModel;
use sfr::pipeline::config::{Method, NormalizationChoice, TrainConfig};
use sfr::pipeline::class_check::ClassCheck;
use sfr::pipeline::{default_work_dir, evaluate_cases, summarize, RunOptions, TrainInputs};
use sfr::stitch::{stitch_image, stitch_labels, StitchLayout};
use sfr::volume::{Geometry, Volume};
use sfr::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sfr", version, about = "SFR: SAM-enabled semi-supervised 3D medical image segmentation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A volume's dims, dtype, geometry (LPS) and value range, or a model's metadata, as JSON;
    /// with --devices, what this build can compute on (libtorch, CUDA).
    Info {
        #[arg(required_unless_present = "devices", conflicts_with = "devices")]
        file: Option<PathBuf>,
        /// The libtorch in use, whether libtorch_cuda is loaded, CUDA/cuDNN and the device "auto" picks.
        #[arg(long)]
        devices: bool,
    },
    /// Re-write a volume (NIfTI in, NIfTI out), keeping voxels and geometry.
    Convert { input: PathBuf, output: PathBuf },
    /// Stitch a volume's slices into one 2D canvas (the paper's first module) as PNG or 2D NIfTI.
    Stitch(StitchArgs),
    /// Train a model: fine-tune SAM on stitched labelled volumes, pseudo-label, re-train a V-Net.
    Train(TrainArgs),
    /// Segment a volume with a trained model; the output has the input's geometry.
    Segment(SegmentArgs),
    /// Segment labelled cases and report Dice, Jaccard, ASD, HD95 per class.
    Evaluate(EvaluateArgs),
    /// A dataset's fingerprint (spacings, shapes, foreground intensities, class sizes) and what
    /// training with a preset makes of it (spacing, patch, how much of the foreground a patch sees), as JSON.
    Plan(PlanArgs),
    /// Train on real MRI shipped with SFR (MSD hippocampus subset) with few labels; compare supervised, mean teacher, SFR and SFR+ on held-out cases; write the model, a segmentation and pictures.
    Demo(demo::DemoArgs),
    /// Run the benchmarks and print one JSON object.
    Bench {
        /// Print JSON (the only format; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
        /// CI-sized run: leaves out SAM at 1024 and the 112×112×80 training step, fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// Threads of libtorch (sfr and PyTorch alike) and of the stitch pool [default: libtorch's].
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Only these sections (stitch, sam, vnet, segment, retrain, contention) or cases (e.g. vnet_train_48x48x32); repeatable or comma-separated.
        #[arg(long, value_name = "SECTION", value_delimiter = ',')]
        only: Vec<String>,
        /// cpu, cuda or auto (CUDA when present).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Timed repetitions per side of each model case [default: 5; 3 for the heavy cases and --quick].
        #[arg(long, value_name = "N")]
        reps: Option<usize>,
        /// Leave out the PyTorch eager reference (sfr timings only).
        #[arg(long)]
        no_pytorch: bool,
    },
}

#[derive(Args)]
struct StitchArgs {
    input: PathBuf,
    /// `.png` (windowed to 8 bits) or `.nii`/`.nii.gz` (a 2D image).
    output: PathBuf,
    /// A label volume to overlay in colour (PNG) or to stitch instead of the image (NIfTI).
    #[arg(long)]
    label: Option<PathBuf>,
    /// Canvas size S (SAM's input size).
    #[arg(long, default_value_t = 1024)]
    canvas: usize,
    /// Stitch the centred patch of this size `X,Y,Z` instead of the whole volume.
    #[arg(long, value_parser = parse_xyz)]
    patch: Option<[usize; 3]>,
}

/// A dataset and which of its cases are labelled (train, plan).
#[derive(Args)]
struct CasesArgs {
    /// Dataset folder in the Decathlon layout (dataset.json, imagesTr/, labelsTr/).
    #[arg(long)]
    data: PathBuf,
    /// The first N cases of dataset.json's training list are labelled; the others are not.
    #[arg(long, conflicts_with = "labeled_list")]
    labeled: Option<usize>,
    /// A file of labelled case ids (one per line); every other case is unlabelled.
    #[arg(long)]
    labeled_list: Option<PathBuf>,
}

impl CasesArgs {
    /// The dataset, its labelled and its unlabelled cases; `all_labelled`: without --labeled
    /// or --labeled-list, every case with a label is labelled (else that is an error).
    fn split(&self, all_labelled: bool) -> Result<(Dataset, Vec<sfr::io::dataset::Case>, Vec<sfr::io::dataset::Case>)> {
        let ds = Dataset::open(&self.data)?;
        let (labeled, unlabeled) = match (&self.labeled, &self.labeled_list) {
            (Some(n), None) => ds.split_first(*n)?,
            (None, Some(f)) => ds.split_by_ids(&read_id_list(f)?)?,
            _ if all_labelled => ds.training.iter().cloned().partition(|c| c.label.is_some()),
            _ => return Err(Error::invalid("say which cases are labelled: --labeled N or --labeled-list FILE")),
        };
        Ok((ds, labeled, unlabeled))
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    cases: CasesArgs,
    /// Use only this many unlabelled cases (after the labelled ones, in dataset.json order).
    #[arg(long)]
    max_unlabeled: Option<usize>,
    #[arg(long, value_parser = parse_method)]
    method: Option<Method>,
    /// SAM pseudo-labels on (the SFR framework).
    #[arg(long, conflicts_with = "no_sam")]
    sfr: bool,
    /// SAM pseudo-labels off: the method alone.
    #[arg(long)]
    no_sam: bool,
    /// SFR+: confidence estimation and selective training.
    #[arg(long)]
    sfr_plus: bool,
    /// Named preset: paper-la (GPU), cpu-small (2-core CPU), cpu-lora (CPU, LoRA on every SAM block), test-tiny (tests).
    #[arg(long, default_value = "cpu-small")]
    preset: String,
    /// A full config JSON file (see --print-config) instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Overrides as a JSON object, e.g. '{"vnet": {"iterations": 200}}'.
    #[arg(long)]
    set: Option<String>,
    /// SAM checkpoint: a file (sam_vit_b_01ec64.pth, lite_medsam.pth, our safetensors), the
    /// name `lite-medsam` (the copy ./scripts/setup.sh keeps in the cache), or `none` (random
    /// SAM). The file decides the architecture (sam.variant becomes auto unless --config or
    /// --set chooses it). Without it: $SFR_SAM_CHECKPOINT, then the cached LiteMedSAM (variant
    /// auto or lite_medsam), else random weights (warned).
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, cuda or auto.
    #[arg(long)]
    device: Option<String>,
    /// libtorch threads; 0 = auto, the cores other work leaves free, re-checked during the run [default: the config's, 0].
    #[arg(long)]
    threads: Option<usize>,
    /// Output model file.
    #[arg(long, default_value = "model.sfrmodel")]
    out: PathBuf,
    /// Folder for checkpoints and pseudo-labels (default: OUT.work).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Continue from the work folder's checkpoint after a crash or kill.
    #[arg(long)]
    resume: bool,
    /// Write SAM pseudo-labels and confidence maps as NIfTI into the work folder.
    #[arg(long)]
    write_pseudo_labels: bool,
    /// With --sfr: train on the pseudo-labels in this folder (`<id>_pseudo.nii.gz` for every
    /// unlabelled case, e.g. another run's OUT.work/pseudo) instead of running SAM again.
    #[arg(long, conflicts_with_all = ["write_pseudo_labels", "sfr_plus", "no_sam"])]
    pseudo_labels: Option<PathBuf>,
    /// Keep a model in which a class failed (never predicted, or far below the others on the
    /// validation or labelled cases) with exit status 0. Without it such a model is still
    /// saved, for inspection, but `sfr train` warns and exits with status 3.
    #[arg(long)]
    allow_weak: bool,
    /// Print the effective config as JSON and exit.
    #[arg(long)]
    print_config: bool,
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    progress: ProgressMode,
}

#[derive(Args)]
struct SegmentArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, required_unless_present = "manifest", conflicts_with = "manifest")]
    input: Option<PathBuf>,
    #[arg(long, required_unless_present = "manifest", conflicts_with = "manifest")]
    output: Option<PathBuf>,
    /// Also write the class probabilities (one volume per class: `P_class<c>.nii.gz`).
    #[arg(long, conflicts_with = "manifest")]
    probabilities: Option<PathBuf>,
    /// Segment every `input,output` row of a CSV file instead (finished outputs are skipped).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// With --manifest: only the rows k with k mod n = i (`$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`).
    #[arg(long, requires = "manifest", value_parser = manifest::parse_shard)]
    shard: Option<(usize, usize)>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    progress: ProgressMode,
}

#[derive(Args)]
struct EvaluateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// A file of case ids to evaluate (default: every case of the folder except those the model
    /// was trained on — labelled, validation and unlabelled — recorded by id in the model).
    #[arg(long)]
    cases: Option<PathBuf>,
    /// Also score the cases the model was trained on (not a test of the model).
    #[arg(long)]
    include_training_cases: bool,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

/// (kept, dropped) pseudo-labels of a model's training, when its pseudo-label guard ran.
fn guard_counts(meta: &sfr::model::ModelMeta) -> Option<(u64, u64)> {
    let g = &meta.training["pseudo_label_guard"];
    match (g["enabled"].as_bool(), g["kept"].as_u64(), g["dropped"].as_u64()) {
        (Some(true), Some(kept), Some(dropped)) => Some((kept, dropped)),
        _ => None,
    }
}

/// The name under which write errors of stdout are reported.
const STDOUT: &str = "<stdout>";

fn write_stdout(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    o.write_fmt(args).and_then(|_| o.write_all(b"\n")).and_then(|_| o.flush()).map_err(|e| Error::io(STDOUT, e))
}

fn parse_xyz(s: &str) -> std::result::Result<[usize; 3], String> {
    let v: Vec<usize> = s.split([',', 'x']).map(|p| p.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|e| e.to_string())?;
    <[usize; 3]>::try_from(v).map_err(|_| "expected X,Y,Z".to_string())
}

fn parse_method(s: &str) -> std::result::Result<Method, String> {
    serde_json::from_value(json!(s)).map_err(|_| format!("unknown method '{s}' (supervised, self-training, mean-teacher, acmt)"))
}

/// `-0.0 + 0.0 == 0.0`: keeps "-0.0" (a sign flip of an exact zero) out of printed geometry.
fn tidy<const N: usize>(a: [f64; N]) -> [f64; N] {
    a.map(|x| x + 0.0)
}

fn info(file: &Path) -> Result<serde_json::Value> {
    if file.extension().is_some_and(|e| e == "sfrmodel" || e == "safetensors") {
        let meta = SfrModel::read_meta(file)?;
        return serde_json::to_value(&meta).map_err(|e| Error::invalid(e.to_string()));
    }
    let v = nifti::read(file)?;
    let g = v.geometry();
    let (min, max) = v.min_max().unwrap_or((f64::NAN, f64::NAN));
    Ok(json!({
        "file": file,
        "dims": v.dims(),
        "dtype": v.dtype().name(),
        "spacing": tidy(g.spacing),
        "origin": tidy(g.origin),
        "direction": tidy(g.direction),
        "min": min,
        "max": max,
    }))
}

/// The centred `[x, y, z]` crop of a volume (clamped to its size).
fn centre_crop<T: Clone>(v: &Volume<T>, patch: [usize; 3]) -> Volume<T> {
    let d = v.dims();
    let size = [0, 1, 2].map(|a| patch[a].min(d[a]));
    let start = [0, 1, 2].map(|a| (d[a] - size[a]) / 2);
    let data = v.data.slice(ndarray::s![start[2]..start[2] + size[2], start[1]..start[1] + size[1], start[0]..start[0] + size[0]]).to_owned();
    let origin = v.geometry.index_to_physical([start[0] as f64, start[1] as f64, start[2] as f64]);
    Volume::new(data, Geometry { origin, ..v.geometry })
}

fn stitch_cmd(a: &StitchArgs) -> Result<()> {
    sfr::limits::check_range("--canvas", a.canvas, 1, sfr::limits::MAX_CANVAS)?;
    let inputs: Vec<&Path> = std::iter::once(a.input.as_path()).chain(a.label.as_deref()).collect();
    sfr::io::check_output(&a.output, &inputs)?;
    let img = nifti::read(&a.input)?.cast::<f32>();
    let lab = a.label.as_ref().map(|p| nifti::read(p).map(|v| v.cast::<u8>())).transpose()?;
    if let Some(l) = &lab {
        if l.dims() != img.dims() {
            return Err(Error::invalid(format!("{}: label dims {:?} differ from the image's {:?}", a.label.as_ref().unwrap().display(), l.dims(), img.dims())));
        }
    }
    let (img, lab) = match a.patch {
        Some(p) => (centre_crop(&img, p), lab.map(|l| centre_crop(&l, p))),
        None => (img, lab),
    };
    let layout = StitchLayout::for_shape(img.data.shape(), a.canvas)
        .map_err(|e| Error::invalid(format!("{}: {e} (use --patch to stitch a part)", a.input.display())))?;
    let canvas = stitch_image(&img.data.view(), &layout)?;
    let lcanvas = lab.as_ref().map(|l| stitch_labels(&l.data.view(), &layout)).transpose()?;
    let out = a.output.to_string_lossy().to_ascii_lowercase();
    if out.ends_with(".png") {
        sfr::io::png::write_canvas_png(&a.output, &canvas.view(), lcanvas.as_ref().map(|c| c.view()).as_ref())?;
    } else {
        // A 2D NIfTI: one slice, the in-plane spacing of the volume.
        let g = Geometry { spacing: [img.geometry.spacing[0], img.geometry.spacing[1], 1.0], ..Geometry::default() };
        let s = layout.canvas;
        match lcanvas {
            Some(l) => nifti::write(&a.output, &Volume::new(l.into_shape_with_order((1, s, s)).unwrap(), g))?,
            None => nifti::write(&a.output, &Volume::new(canvas.into_shape_with_order((1, s, s)).unwrap(), g))?,
        }
    }
    note!(
        "stitched {:?} (x,y,z) as a {}x{} grid on a {}x{} canvas -> {}",
        img.dims(),
        layout.n_row,
        layout.n_col,
        layout.canvas,
        layout.canvas,
        a.output.display()
    );
    Ok(())
}

fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_json(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?).map_err(|e| Error::format(p, e.to_string()))?,
        None => TrainConfig::preset(&a.preset)?,
    };
    // Whether --set chooses the SAM variant decides what --sam-checkpoint may change below.
    let mut set_variant = false;
    if let Some(s) = &a.set {
        let over = sfr::pipeline::config::parse_overrides(s)?;
        set_variant = over.pointer("/sam/variant").is_some();
        c = c.with_override_value(over)?;
    }
    if let Some(m) = a.method {
        c.method = m;
    }
    if a.sfr {
        c.sfr = true;
    }
    if a.no_sam {
        c.sfr = false;
    }
    if a.sfr_plus {
        c.sfr = true;
        c.sfr_plus.enabled = true;
    }
    if let Some(p) = &a.sam_checkpoint {
        // The variant the user chose in --config or --set stays.
        c.sam.name_checkpoint(p, a.config.is_some() || set_variant);
    }
    if let Some(s) = a.seed {
        c.seed = s;
    }
    if let Some(d) = &a.device {
        c.device = d.clone();
    }
    if let Some(t) = a.threads {
        c.threads = t;
    }
    c.validate()?;
    Ok(c)
}

#[derive(Args)]
struct PlanArgs {
    /// Without --labeled or --labeled-list every case with a label counts as labelled.
    #[command(flatten)]
    cases: CasesArgs,
    /// Named preset, as for train.
    #[arg(long, default_value = "cpu-small")]
    preset: String,
    /// Config overrides as JSON, as for train (e.g. '{"spacing": [1.25, 1.25, 1.25]}').
    #[arg(long)]
    set: Option<String>,
}

fn plan_cmd(a: PlanArgs) -> Result<()> {
    let mut cfg = TrainConfig::preset(&a.preset)?;
    if let Some(s) = &a.set {
        cfg = cfg.with_override_value(sfr::pipeline::config::parse_overrides(s)?)?;
    }
    cfg.validate()?;
    let (ds, labeled, unlabeled) = a.cases.split(true)?;
    cfg.normalization = resolve_normalization(cfg.normalization, &ds);
    let fp = sfr::pipeline::plan::fingerprint(&sfr::pipeline::sources(&labeled), &sfr::pipeline::sources(&unlabeled), &ds.labels)?;
    let plan = sfr::pipeline::plan::plan(&fp, &cfg);
    for n in &plan.notes {
        eprintln!("note: {n}");
    }
    out!("{}", serde_json::to_string_pretty(&json!({"dataset": ds.name, "fingerprint": fp, "plan": plan})).map_err(|e| Error::invalid(e.to_string()))?);
    Ok(())
}

/// `auto` made definite by the dataset's declared modality, said on stderr.
fn resolve_normalization(choice: NormalizationChoice, ds: &Dataset) -> NormalizationChoice {
    let resolved = choice.resolve(ds.modality.as_deref());
    if choice == NormalizationChoice::Auto {
        let why = match &ds.modality {
            Some(m) => format!("dataset.json names the modality \"{m}\""),
            None => "dataset.json names no modality".into(),
        };
        let what = if resolved == NormalizationChoice::Ct { "CT (one intensity window from the labelled foreground)" } else { "per-volume z-score" };
        eprintln!("normalisation: {what}: {why} (--set '{{\"normalization\": \"ct\"}}' or \"zscore\" chooses)");
    }
    resolved
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    let mut cfg = train_config(&a)?;
    if a.print_config {
        out!("{}", cfg.to_json());
        return Ok(());
    }
    if a.pseudo_labels.is_some() && !cfg.sfr {
        return Err(Error::invalid("--pseudo-labels trains on pseudo-labels: it needs SFR on (--sfr)"));
    }
    if let Some(dir) = a.pseudo_labels.as_deref().filter(|d| !d.is_dir()) {
        return Err(Error::invalid(format!("{}: --pseudo-labels needs a folder of pseudo-labels, and this is not one", dir.display())));
    }
    if cfg.sfr && a.pseudo_labels.is_none() {
        // Fail before reading data when a named checkpoint is missing, and say which SAM runs.
        match sfr::nn::sam::checkpoint::resolve(cfg.sam.checkpoint.as_deref(), &cfg.sam.variant)? {
            Some(r) => eprintln!("SAM checkpoint: {} ({})", r.path.display(), r.source),
            None => eprintln!("WARNING: {}", sfr::nn::sam::checkpoint::random_warning(if cfg.sam.variant == "auto" { "tiny" } else { &cfg.sam.variant })),
        }
    }
    let (ds, labeled, mut unlabeled) = a.cases.split(false)?;
    cfg.normalization = resolve_normalization(cfg.normalization, &ds);
    // Before any work: the model must not overwrite any file the run reads (a dataset image,
    // the config...), and its folder and the work folder must be writable, so that a run
    // cannot fail at its end.
    let json_path = a.cases.data.join("dataset.json");
    let mut inputs: Vec<&Path> = vec![&json_path];
    for c in &ds.training {
        inputs.push(&c.image);
        inputs.extend(c.label.as_deref());
    }
    inputs.extend(ds.test.iter().map(|p| p.as_path()));
    inputs.extend(a.config.as_deref());
    inputs.extend(a.cases.labeled_list.as_deref());
    inputs.extend(cfg.sam.checkpoint.as_deref());
    sfr::io::check_output(&a.out, &inputs)?;
    let work_dir = a.work_dir.clone().unwrap_or_else(|| default_work_dir(&a.out));
    sfr::io::check_dir_creatable(&work_dir)?;
    // The pipeline's own rule, applied before any work: a request that cannot be met is an error.
    sfr::pipeline::validation_count(cfg.validation_cases, labeled.len())?;
    if let Some(m) = a.max_unlabeled {
        unlabeled.truncate(m);
    }
    let inputs = TrainInputs { labeled: sfr::pipeline::sources(&labeled), unlabeled: sfr::pipeline::sources(&unlabeled), classes: ds.labels.clone(), dataset_name: ds.name.clone() };
    let opts = RunOptions { work_dir: Some(work_dir), resume: a.resume, write_pseudo_labels: a.write_pseudo_labels, pseudo_labels_from: a.pseudo_labels.clone(), sam_probe: None };
    let out = a.out.clone();
    let t = std::time::Instant::now();
    let model = run_job(a.progress, move |r| {
        let m = sfr::pipeline::train(&cfg, &inputs, &opts, r)?;
        m.save(&out)?;
        Ok(m)
    })?;
    let val = model.meta.validation.as_ref().and_then(|v| v.get("mean_dice")).and_then(|d| d.as_f64());
    note!(
        "saved {} ({} V-Net parameters, method {}, SFR {}) in {:.0} s{}",
        a.out.display(),
        model.net().num_parameters(),
        model.meta.training["method"].as_str().unwrap_or("?"),
        model.meta.training["sfr"],
        t.elapsed().as_secs_f64(),
        val.map(|d| format!("; validation mean Dice {d:.4}")).unwrap_or_default()
    );
    // Said again at the end, where it is read: progress bars hide the log lines of the run.
    if let Some((kept, dropped)) = guard_counts(&model.meta) {
        let warn = if 2 * dropped > kept + dropped { "WARNING: " } else { "" };
        note!("{warn}pseudo-label guard: {kept} of {} SAM pseudo-labels trained the V-Net, {dropped} dropped (per case and why: `sfr info {}`, training.pseudo_label_guard)", kept + dropped, a.out.display());
    }
    if let Some(fit) = model.meta.training["training_fit"]["mean_dice"].as_f64() {
        note!("no labelled case was held out for validation; fit on the training cases: mean Dice {fit:.4} (not a test: score held-out cases with sfr evaluate)");
    }
    if let Some(w) = ClassCheck::from_training(&model.meta.training).and_then(|c| c.warning()) {
        note!("WARNING: {w} (model saved for inspection: {})", a.out.display());
        if !a.allow_weak {
            return Err(Error::invalid(WEAK_MODEL));
        }
    }
    Ok(())
}

/// Said whenever a model that failed its training check is used.
fn warn_if_failed(model: &SfrModel, path: &Path) {
    if let Some(w) = ClassCheck::from_training(&model.meta.training).and_then(|c| c.warning()) {
        note!("WARNING: {}: {w}", path.display());
    }
}

/// The error of a training whose class check failed; `main` gives it exit status 3.
const WEAK_MODEL: &str = "a class failed the training check (see the warning above); --allow-weak accepts such a model";

/// `P.nii.gz` -> `P_class<c>.nii.gz` for each class `c`.
fn probability_paths(p: &Path, classes: usize) -> Vec<PathBuf> {
    let stem = p.to_string_lossy().trim_end_matches(".gz").trim_end_matches(".nii").to_string();
    (0..classes).map(|c| PathBuf::from(format!("{stem}_class{c}.nii.gz"))).collect()
}

fn segment_cmd(a: SegmentArgs) -> Result<()> {
    let device = sfr::nn::parse_device(&a.device)?;
    if let Some(m) = &a.manifest {
        return segment_manifest(&a, m, device);
    }
    let (input, output) = (a.input.clone().expect("clap: --input"), a.output.clone().expect("clap: --output"));
    // Refused before any work: an output that is an input, or one that cannot be written.
    let inputs = [input.as_path(), a.model.as_path()];
    sfr::io::check_output(&output, &inputs)?;
    nifti::check_output_name(&output)?;
    let model = SfrModel::load(&a.model, device)?;
    warn_if_failed(&model, &a.model);
    let prob_paths = a.probabilities.as_deref().map(|p| probability_paths(p, model.num_classes())).unwrap_or_default();
    for p in &prob_paths {
        sfr::io::check_output(p, &inputs)?;
        if sfr::io::same_file(p, &output) || *p == output {
            return Err(Error::invalid(format!("{}: the label output and a probability output are the same file", p.display())));
        }
    }
    let img = nifti::read(&input)?.cast::<f32>();
    let out = output;
    let classes = model.meta.classes.clone();
    let (seg, probs) = run_job(a.progress, move |r| model.segment(&img, Some(r)))?;
    // Write probabilities first, the label last: the label file is the "done" signal.
    for (p, map) in prob_paths.iter().zip(probs.outer_iter()) {
        nifti::write(p, &seg.with_data(map.to_owned())?)?;
    }
    manifest::write_labels(&out, &seg, &classes)?;
    let counts: Vec<String> = classes.iter().map(|(c, n)| format!("{n}: {}", seg.data.iter().filter(|&&v| v as u16 == *c).count())).collect();
    note!("wrote {} (voxels per class: {})", out.display(), counts.join(", "));
    Ok(())
}

/// `segment --manifest`: one model, the rows of one shard; a summary on stderr, one line per row
/// on stdout (`segmented|skipped|failed <input> -> <output>`), and failure if any row failed.
fn segment_manifest(a: &SegmentArgs, manifest_path: &Path, device: tch::Device) -> Result<()> {
    let all = manifest::read(manifest_path)?;
    let total = all.len();
    let (i, n) = a.shard.unwrap_or((0, 1));
    let rows = manifest::shard(all, (i, n));
    let model = SfrModel::load(&a.model, device)?;
    warn_if_failed(&model, &a.model);
    note!("{}: shard {i}/{n}: {} of {total} rows", manifest_path.display(), rows.len());
    let results = run_job(a.progress, move |r| manifest::run(&model, &rows, r))?;
    let mut counts = [0usize; 3];
    for (row, outcome) in &results {
        let (k, word) = match outcome {
            manifest::Outcome::Segmented => (0, "segmented"),
            manifest::Outcome::Skipped => (1, "skipped"),
            manifest::Outcome::Failed(why) => {
                note!("line {}: {}: {why}", row.line, row.input.display());
                (2, "failed")
            }
        };
        counts[k] += 1;
        out!("{word} {} -> {}", row.input.display(), row.output.display());
    }
    note!("shard {i}/{n}: {} segmented, {} skipped (output exists), {} failed", counts[0], counts[1], counts[2]);
    if counts[2] > 0 {
        return Err(Error::invalid(format!("{}: {} of {} rows failed (see above); rerun to retry them", manifest_path.display(), counts[2], results.len())));
    }
    Ok(())
}

/// Ids of every case recorded as used in training (`training.case_ids`). Models written before
/// ids were recorded have none: for those, nothing is skipped, and that is said.
fn training_case_ids(training: &serde_json::Value) -> std::collections::HashSet<String> {
    let ids = &training["case_ids"];
    if ids.is_null() {
        note!("note: this model does not record which cases it was trained on (older format): no case is skipped");
    }
    ["labeled", "validation", "unlabeled"]
        .iter()
        .flat_map(|k| ids[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    let device = sfr::nn::parse_device(&a.device)?;
    let model = SfrModel::load(&a.model, device)?;
    warn_if_failed(&model, &a.model);
    let ds = Dataset::open(&a.data)?;
    let cases: Vec<_> = match &a.cases {
        Some(f) => read_id_list(f)?.iter().map(|id| ds.case(id).cloned()).collect::<Result<_>>()?,
        None => {
            let seen = training_case_ids(&model.meta.training);
            let (kept, skipped): (Vec<_>, Vec<_>) = ds.training.iter().cloned().partition(|c| a.include_training_cases || !seen.contains(&c.id));
            if !skipped.is_empty() {
                note!(
                    "skipped {} of {} cases that the model was trained on (labelled, validation or unlabelled, recorded by id in {}); --include-training-cases scores them too",
                    skipped.len(),
                    ds.training.len(),
                    a.model.display()
                );
            } else if a.include_training_cases && !seen.is_empty() {
                note!("scoring training cases too (--include-training-cases): this is not a test of the model");
            }
            kept
        }
    };
    if cases.is_empty() {
        return Err(Error::invalid(format!("no cases to evaluate in {} (every case was used in training, or the list is empty)", a.data.display())));
    }
    let per_case = evaluate_cases(&model, &cases, None)?;
    let rows: Vec<_> = per_case.iter().map(|(_, m)| m.clone()).collect();
    let summary = summarize(&rows, &model.meta.classes);
    if a.json {
        let cases_json: Vec<_> = per_case.iter().map(|(id, m)| json!({"case": id, "classes": m})).collect();
        out!("{}", serde_json::to_string_pretty(&json!({"model": a.model, "cases": cases_json, "summary": summary})).unwrap());
    } else {
        out!("{} cases from {}", cases.len(), a.data.display());
        out!("{:<16} {:>16} {:>10} {:>10} {:>10}", "class", "Dice (%)", "Jaccard", "ASD mm", "HD95 mm");
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        for s in &summary {
            out!(
                "{:<16} {:>9.2} ± {:<5.2} {:>10.2} {:>10} {:>10}",
                s.name,
                100.0 * s.dice_mean,
                100.0 * s.dice_std,
                100.0 * s.jaccard_mean,
                f(s.asd_mean),
                f(s.hd95_mean)
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { file, devices } => {
            let v = match file {
                Some(f) if !devices => info(&f)?,
                _ => sfr::nn::device_info(),
            };
            out!("{}", serde_json::to_string_pretty(&v).unwrap())
        }
        Command::Convert { input, output } => {
            sfr::io::check_output(&output, &[&input])?;
            nifti::check_output_name(&output)?;
            let v = nifti::read(&input)?;
            nifti::write_any(&output, &v)?;
            note!("wrote {} ({} {:?})", output.display(), v.dtype().name(), v.dims());
        }
        Command::Stitch(a) => stitch_cmd(&a)?,
        Command::Train(a) => train_cmd(a)?,
        Command::Segment(a) => segment_cmd(a)?,
        Command::Evaluate(a) => evaluate_cmd(a)?,
        Command::Plan(a) => plan_cmd(a)?,
        Command::Demo(a) => demo::run(a)?,
        Command::Bench { json: _, quick, threads, only, device, reps, no_pytorch } => {
            let opts = bench::BenchOptions { quick, threads, only, device, reps, pytorch: !no_pytorch };
            out!("{}", serde_json::to_string_pretty(&bench::run_with(&opts)?).unwrap())
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Before any thread starts: freed tensors stay in the heap instead of being unmapped and
    // faulted in again at every forward (src/malloc.rs; SFR_MALLOC=system turns this off).
    sfr::malloc::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp(None).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`sfr info M | head -0`): nothing to report to
        // anyone; the status of a program killed by SIGPIPE, as other tools give.
        Err(Error::Io { path, source }) if path == Path::new(STDOUT) && source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(141),
        Err(Error::Invalid(m)) if m == WEAK_MODEL => {
            note!("error: {m}");
            ExitCode::from(3)
        }
        Err(Error::Cancelled) => {
            note!("cancelled: nothing was written");
            ExitCode::from(130)
        }
        Err(e) => {
            note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(args: &[&str]) -> TrainConfig {
        let cli = Cli::try_parse_from(["sfr", "train", "--data", "d"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Train(a) => train_config(&a).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_named_sam_checkpoint_decides_the_architecture() {
        let tiny = ["--preset", "test-tiny"];
        assert_eq!(config_of(&tiny).sam.variant, "tiny", "test-tiny's SAM from scratch");
        let c = config_of(&[&tiny[..], &["--sam-checkpoint", "lite-medsam"]].concat());
        assert_eq!((c.sam.variant.as_str(), c.sam.checkpoint.as_deref()), ("auto", Some(Path::new("lite-medsam"))));
        assert_eq!(config_of(&[&tiny[..], &["--sam-checkpoint", "none"]].concat()).sam.variant, "tiny");
        let chosen = config_of(&[&tiny[..], &["--sam-checkpoint", "lite-medsam", "--set", r#"{"sam": {"variant": "lite_medsam"}}"#]].concat());
        assert_eq!(chosen.sam.variant, "lite_medsam", "--set's choice stays");
    }
}
