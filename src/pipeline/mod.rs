//! SFR and SFR+: stitch -> fine-tune SAM -> pseudo-label -> re-train a V-Net semi-supervised.
//!
//! `train` runs the three stages as one job: load and check the cases, hold out validation
//! cases from the labelled ones, fine-tune SAM and pseudo-label the unlabelled cases (when
//! `sfr` is on), re-train the V-Net with the chosen SSL method, validate, and return the model.
//! Labels of unlabelled cases are never opened (`Case::label` is `None` for them).
pub mod class_check;
pub mod config;
pub mod data;
pub mod guard;
pub mod plan;
pub mod retrain;
pub mod sam_stage;

use crate::error::{Error, Result};
use crate::io::dataset::Case;
use crate::io::nifti;
use crate::job::Reporter;
use crate::limits::Classes;
use crate::metrics::{evaluate_labels, ClassMetrics};
use crate::model::{ModelMeta, SfrModel, FORMAT, FORMAT_VERSION};
use crate::volume::{Normalization, Volume};
use class_check::ClassCheck;
use config::{NormalizationChoice, TrainConfig};
use data::{load_source_raw, CaseSource, Sample};
use retrain::{retrain, Checkpointing, UnlabeledCase};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to train on.
pub struct TrainInputs {
    pub labeled: Vec<CaseSource>,
    pub unlabeled: Vec<CaseSource>,
    /// Class index -> name, background (0) included.
    pub classes: Classes,
    pub dataset_name: String,
}

/// Where a run keeps its checkpoints and optional outputs.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Folder for checkpoints (`--resume` continues from it) and pseudo-label outputs.
    pub work_dir: Option<PathBuf>,
    pub resume: bool,
    /// Write SAM pseudo-labels and confidence maps as NIfTI into `work_dir/pseudo/`.
    pub write_pseudo_labels: bool,
    /// Train on the pseudo-labels in this folder (`<id>_pseudo.nii.gz` per unlabelled case, as
    /// `write_pseudo_labels` writes them) instead of running the SAM stage: SAM's pseudo-labels
    /// of one run, or another model's, train several V-Nets at the cost of one SAM stage. The
    /// pseudo-label guard still applies. SFR only (SFR+ fine-tunes SAM between its rounds).
    pub pseudo_labels_from: Option<PathBuf>,
    /// Looks at SAM during its first fine-tuning (`sam_stage::SamProbe`; the demo's
    /// pseudo-label curve).
    pub sam_probe: Option<sam_stage::SamProbe>,
}

/// Mean ± std over cases of the per-class metrics.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub class: u16,
    pub name: String,
    pub dice_mean: f64,
    pub dice_std: f64,
    pub jaccard_mean: f64,
    pub asd_mean: Option<f64>,
    pub hd95_mean: Option<f64>,
    pub cases: usize,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

/// Summarises per-case metrics per class; distances average over the cases where defined.
pub fn summarize(per_case: &[Vec<ClassMetrics>], classes: &BTreeMap<u16, String>) -> Vec<Summary> {
    let mut out = vec![];
    for (&c, name) in classes.iter().filter(|(&c, _)| c != 0) {
        let rows: Vec<&ClassMetrics> = per_case.iter().flat_map(|v| v.iter().filter(|m| m.class == c)).collect();
        let dice: Vec<f64> = rows.iter().map(|m| m.dice).collect();
        let jac: Vec<f64> = rows.iter().map(|m| m.jaccard).collect();
        let opt_mean = |f: &dyn Fn(&ClassMetrics) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(|m| f(m)).collect();
            (!v.is_empty()).then(|| mean_std(&v).0)
        };
        let (dm, ds) = mean_std(&dice);
        out.push(Summary {
            class: c,
            name: name.clone(),
            dice_mean: dm,
            dice_std: ds,
            jaccard_mean: mean_std(&jac).0,
            asd_mean: opt_mean(&|m| m.asd),
            hd95_mean: opt_mean(&|m| m.hd95),
            cases: rows.len(),
        });
    }
    out
}

/// Segments `cases` (which must have labels) with `model` and computes per-class metrics.
pub fn evaluate_cases(model: &SfrModel, cases: &[Case], reporter: Option<&Reporter>) -> Result<Vec<(String, Vec<ClassMetrics>)>> {
    let sources: Vec<CaseSource> = cases.iter().cloned().map(CaseSource::Files).collect();
    evaluate_sources(model, &sources, reporter)
}

/// [`evaluate_cases`] for files or in-memory cases.
pub fn evaluate_sources(model: &SfrModel, cases: &[CaseSource], reporter: Option<&Reporter>) -> Result<Vec<(String, Vec<ClassMetrics>)>> {
    let classes: Vec<u16> = model.meta.classes.keys().cloned().filter(|&c| c != 0).collect();
    let mut out = vec![];
    for case in cases {
        let (img, reference, _, _) = case.read()?;
        let reference = reference.ok_or_else(|| Error::invalid(format!("case {} has no label to evaluate against", case.id())))?;
        let (pred, _) = model.segment(&img, None)?;
        out.push((case.id().to_string(), evaluate_labels(&pred, &reference, &classes)?));
        if let Some(r) = reporter {
            r.check()?;
        }
    }
    Ok(out)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Labelled cases to hold out for validation: `requested`, or by default none for up to 8
/// labelled cases and 10% (at least 1) above. Never more than half of them.
pub fn validation_count(requested: Option<usize>, n_labeled: usize) -> Result<usize> {
    match requested {
        None if n_labeled <= 8 => Ok(0),
        None => Ok((n_labeled / 10).max(1)),
        Some(v) if v > n_labeled / 2 => Err(Error::invalid(format!(
            "validation_cases {v}: too many for {n_labeled} labelled cases (at most half, {}, may be held out)",
            n_labeled / 2
        ))),
        Some(v) => Ok(v),
    }
}

/// The normalisation a training run applies, from the labelled cases' raw intensities.
/// `auto` is the z-score here: the dataset's modality resolves it before (`sfr train` reads
/// dataset.json's), and in-memory cases name none.
pub fn training_normalization(choice: NormalizationChoice, labeled: &[Sample]) -> Result<Normalization> {
    match choice.resolve(None) {
        NormalizationChoice::Ct => {
            let mut fg: Vec<f32> = vec![];
            for s in labeled {
                // Named here: the window's own check could only say "the labelled cases".
                if s.image.iter().any(|v| !v.is_finite()) {
                    return Err(Error::invalid(format!("case {}: the image contains NaN or infinite voxels", s.id)));
                }
                if let Some(l) = &s.label {
                    fg.extend(s.image.iter().zip(l).filter(|(_, &c)| c > 0).map(|(&v, _)| v));
                }
            }
            Normalization::ct_from_foreground(&mut fg, "the labelled cases")
        }
        _ => Ok(Normalization::ZscorePerVolume),
    }
}

/// Whether every labelled image (raw) reaches -900 or below: air in Hounsfield units. MRI, and
/// images already normalised, never do.
fn looks_like_ct(labeled: &[Sample]) -> bool {
    !labeled.is_empty() && labeled.iter().all(|s| s.image.iter().any(|&v| v <= -900.0))
}

/// Runs SFR / SFR+ (or the method alone when `sfr` is off) and returns the trained model.
pub fn train(cfg: &TrainConfig, inputs: &TrainInputs, opts: &RunOptions, reporter: &Reporter) -> Result<SfrModel> {
    cfg.validate()?;
    let stages_mark = reporter.stages_started();
    let device = crate::nn::parse_device(&cfg.device)?;
    // Said once per run, so a silent fall-back of "auto" to the CPU shows in the log and GUIs.
    reporter.message(&format!("training on {} (device \"{}\")", crate::nn::device_name(device), cfg.device));
    // Fixed, or sized to the free cores and re-checked every iteration of the loops below.
    crate::threads::configure(cfg.threads);
    // Classes 0..N-1 without gaps (a gap would train an undeclared class).
    let num_classes = inputs.classes.len();
    if inputs.labeled.is_empty() {
        return Err(Error::invalid("zero labelled cases: at least one is needed"));
    }
    if opts.pseudo_labels_from.is_some() && !cfg.sfr {
        return Err(Error::invalid("pseudo-labels from a folder train the V-Net only with SFR on (--sfr)"));
    }
    if opts.pseudo_labels_from.is_some() && cfg.sfr_plus.enabled {
        return Err(Error::invalid("SFR+ fine-tunes SAM again on its confident pseudo-labels between rounds: it cannot start from a folder of pseudo-labels"));
    }
    let n_val = validation_count(cfg.validation_cases, inputs.labeled.len())?;
    if n_val == 0 && cfg.validation_cases.is_none() {
        reporter.message(&format!("all {} labelled cases train the model (no validation split with 8 or fewer)", inputs.labeled.len()));
    }
    let (train_cases, val_cases) = inputs.labeled.split_at(inputs.labeled.len() - n_val);
    reporter.stage("load", (train_cases.len() + inputs.unlabeled.len()) as u64, "reading and checking the cases")?;
    let mut labeled: Vec<Sample> = Vec::with_capacity(train_cases.len());
    for (i, c) in train_cases.iter().enumerate() {
        if !c.has_label() {
            return Err(Error::invalid(format!("case {} is listed as labelled but has no label", c.id())));
        }
        labeled.push(load_source_raw(c, num_classes)?);
        reporter.step(i as u64 + 1, f64::NAN)?;
    }
    // The labelled cases decide a CT window; every case is normalised once it is read.
    if cfg.normalization == NormalizationChoice::Auto && looks_like_ct(&labeled) {
        reporter.message(
            "WARNING: every labelled image has voxels at or below -900, as air has in a CT's Hounsfield units, but nothing declares the scans CT: \
             they get the per-volume z-score. If they are CT, train with --set '{\"normalization\": \"ct\"}' (or \"modality\": {\"0\": \"CT\"} in dataset.json); \
             \"zscore\" keeps the z-score and silences this",
        );
    }
    let normalization = training_normalization(cfg.normalization, &labeled)?;
    reporter.message(&format!("intensity normalisation: {}", normalization.describe()));
    for (s, c) in labeled.iter_mut().zip(train_cases) {
        normalization.apply_in_place(&mut s.image, &c.image_name())?;
    }
    let mut unl_samples: Vec<Sample> = Vec::with_capacity(inputs.unlabeled.len());
    for (i, c) in inputs.unlabeled.iter().enumerate() {
        // Unlabelled cases: the label is dropped even if the caller passed one.
        let mut s = load_source_raw(&c.without_label(), num_classes)?;
        normalization.apply_in_place(&mut s.image, &c.image_name())?;
        unl_samples.push(s);
        reporter.step((train_cases.len() + i) as u64 + 1, f64::NAN)?;
    }
    let all = || labeled.iter().chain(&unl_samples);
    let median = [0, 1, 2].map(|a| plan::median(all().map(|s| s.geometry.spacing[a]).collect()).unwrap_or(1.0));
    let extent_mm = [0, 1, 2].map(|a| plan::median(all().map(|s| s.geometry.spacing[a] * s.dims()[a] as f64).collect()).unwrap_or(0.0));
    let fg_extents: Vec<[f64; 3]> = labeled.iter().filter_map(|s| plan::foreground_extent_mm(s.label.as_ref()?, s.geometry.spacing)).collect();
    let fg_mm = (!fg_extents.is_empty()).then(|| [0, 1, 2].map(|a| plan::median(fg_extents.iter().map(|e| e[a]).collect()).unwrap_or(0.0)));
    let grid = plan::plan_grid(cfg, median, fg_mm, extent_mm);
    let spacing = grid.spacing;
    if grid.spacing_from == plan::SPACING_FROM_CONTEXT {
        reporter.message(&format!(
            "training spacing {spacing:?} mm: the median {median:?} mm coarsened so that one {:?} patch spans at least {:.0}% of the labelled foreground's median extent ({:?} mm); `patch_context` 0 trains at the median",
            grid.patch,
            100.0 * cfg.patch_context,
            fg_mm.unwrap_or_default()
        ));
    }
    // From here on the planned patch and stride are the configuration: SAM's canvas, the V-Net's
    // crops, validation and the model file all use them.
    let planned = grid.applied_to(cfg);
    planned.validate()?;
    let cfg = &planned;
    if cfg.patch_budget > 0 {
        reporter.message(&format!(
            "patch {:?} voxels, stride {:?}: planned within {} voxels to span the labelled foreground at {spacing:?} mm (`sfr plan` shows why; --set '{{\"patch\": [x, y, z]}}' fixes one)",
            grid.patch, grid.stride, cfg.patch_budget
        ));
    }
    // Every volume at the training spacing: the network learns one physical scale, the one
    // segmentation resamples scans to (the model records it).
    let off_grid = all().filter(|s| s.geometry.dims_at_spacing(s.dims(), spacing) != s.dims()).count();
    if off_grid > 0 {
        reporter.message(&format!(
            "resampling {off_grid} of {} training volumes to the training spacing {spacing:?} mm",
            labeled.len() + unl_samples.len()
        ));
        labeled = labeled.into_iter().map(|s| s.at_spacing(spacing, num_classes)).collect();
        unl_samples = unl_samples.into_iter().map(|s| s.at_spacing(spacing, num_classes)).collect();
    }

    let mut sam_summary = serde_json::Value::Null;
    let mut guard_record = serde_json::Value::Null;
    let mut unlabeled: Vec<UnlabeledCase> = vec![];
    // Where the pseudo-labels came from, for the resume checkpoint's identity: SAM's run again
    // (the same up to floating-point noise when the thread count changed), a folder's are
    // named by their content.
    let mut pseudo_label_source = String::new();
    let mut labeled_for_vnet = labeled;
    if cfg.sfr && !unl_samples.is_empty() {
        let (pseudo_labels, confident) = match &opts.pseudo_labels_from {
            Some(dir) => {
                reporter.stage("pseudolabel", unl_samples.len() as u64, &format!("reading the pseudo-labels of {} unlabelled volumes from {}", unl_samples.len(), dir.display()))?;
                let mut labels = Vec::with_capacity(unl_samples.len());
                for (i, s) in unl_samples.iter().enumerate() {
                    labels.push(data::read_pseudo_label(dir, s, num_classes)?);
                    reporter.step(i as u64 + 1, f64::NAN)?;
                }
                sam_summary = serde_json::json!({ "pseudo_labels_from": dir });
                pseudo_label_source = format!("folder {:016x}", retrain::fnv1a(labels.iter().flat_map(|l| l.iter().copied())));
                (labels, vec![false; unl_samples.len()])
            }
            None => {
                let (sam_module, pseudo, confident) = sam_stage::run_sam_stage(cfg, num_classes, &labeled_for_vnet, &unl_samples, device, reporter, opts.sam_probe.as_ref())?;
                let confidences: Vec<f64> = pseudo.iter().map(|p| p.confidence).collect();
                if opts.write_pseudo_labels {
                    let dir = opts.work_dir.as_ref().ok_or_else(|| Error::invalid("writing pseudo-labels needs a work folder"))?.join("pseudo");
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    for (s, p) in unl_samples.iter().zip(&pseudo) {
                        nifti::write(data::pseudo_label_path(&dir, &s.id), &Volume::new(p.label.clone(), s.geometry))?;
                        let conf = p.probabilities.fold_axis(ndarray::Axis(0), 0f32, |a, &b| a.max(b));
                        nifti::write(dir.join(format!("{}_confidence.nii.gz", s.id)), &Volume::new(conf, s.geometry))?;
                    }
                    reporter.message(&format!("pseudo-labels written to {}", dir.display()));
                }
                sam_summary = serde_json::json!({
                    // What ran, after `auto` and the checkpoint look-up (nn::sam::checkpoint).
                    "variant": sam_module.sam.cfg.name,
                    "checkpoint": sam_module.checkpoint.as_ref().map(|r| &r.path),
                    "image_size": cfg.sam.image_size,
                    "mean_confidence": confidences.iter().sum::<f64>() / confidences.len().max(1) as f64,
                    "confident_samples": confident.iter().filter(|&&c| c).count(),
                });
                pseudo_label_source = "sam".into();
                (pseudo.into_iter().map(|p| p.label).collect(), confident)
            }
        };
        // Only pseudo-labels whose class fractions agree with the labelled cases train the
        // V-Net (pipeline::guard): with few labels, bad ones would outvote the labels.
        let guarded = guard::guard_pseudo_labels(cfg, &inputs.classes, &labeled_for_vnet, unl_samples, pseudo_labels, confident, reporter)?;
        labeled_for_vnet.extend(guarded.absorbed);
        unlabeled = guarded.unlabeled;
        guard_record = guarded.record;
    } else {
        if cfg.sfr {
            reporter.message("SFR is on but there are no unlabelled cases: SAM is skipped");
        }
        unlabeled = unl_samples.into_iter().map(|s| UnlabeledCase { sample: s, sam_pseudo: None }).collect();
    }
    let ck = opts.work_dir.as_ref().filter(|_| cfg.checkpoint_every > 0).map(|d| Checkpointing { path: d.join("retrain.ckpt.safetensors"), every: cfg.checkpoint_every, pseudo_labels: pseudo_label_source });
    if let Some(d) = &opts.work_dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let (vs, net) = retrain(cfg, num_classes, &labeled_for_vnet, &unlabeled, device, reporter, ck.as_ref(), opts.resume)?;
    let meta = ModelMeta {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: crate::VERSION.into(),
        classes: inputs.classes.clone(),
        patch: cfg.patch,
        normalization: normalization.name().into(),
        normalization_window: normalization.window(),
        spacing,
        vnet: net.config().clone(),
        inference: cfg.inference.clone(),
        training: serde_json::json!({
            "method": cfg.method.name(),
            "sfr": cfg.sfr,
            "sfr_plus": cfg.sfr_plus.enabled,
            "preset": cfg.preset,
            "seed": cfg.seed,
            "spacing_from": grid.spacing_from,
            "patch_from": grid.patch_from,
            "device": crate::nn::device_name(device),
            "dataset": inputs.dataset_name,
            "labeled_cases": train_cases.len(),
            "unlabeled_cases": inputs.unlabeled.len(),
            "validation_cases": val_cases.iter().map(|c| c.id().to_string()).collect::<Vec<_>>(),
            // Every case this model has seen in training, by id, so that `sfr evaluate` never
            // scores one of them by surprise.
            "case_ids": {
                "labeled": train_cases.iter().map(|c| c.id().to_string()).collect::<Vec<_>>(),
                "validation": val_cases.iter().map(|c| c.id().to_string()).collect::<Vec<_>>(),
                "unlabeled": inputs.unlabeled.iter().map(|c| c.id().to_string()).collect::<Vec<_>>(),
            },
            "sam": sam_summary,
            // Which SAM pseudo-labels trained the V-Net, per case, and why others did not.
            "pseudo_label_guard": guard_record,
            "config": cfg,
        }),
        validation: None,
        created_unix: unix_now(),
    };
    let mut model = SfrModel::new(vs, net, meta);
    if !val_cases.is_empty() {
        reporter.stage("validate", val_cases.len() as u64, "segmenting the validation cases")?;
        let per_case = evaluate_sources(&model, val_cases, Some(reporter))?;
        let rows: Vec<Vec<ClassMetrics>> = per_case.iter().map(|(_, m)| m.clone()).collect();
        let summary = summarize(&rows, &inputs.classes);
        let mean_dice = summary.iter().map(|s| s.dice_mean).sum::<f64>() / summary.len().max(1) as f64;
        reporter.message(&format!("validation mean Dice {:.4} on {} cases", mean_dice, val_cases.len()));
        model.meta.validation = Some(serde_json::json!({"mean_dice": mean_dice, "classes": summary}));
        model.meta.training["class_check"] = serde_json::to_value(ClassCheck::new(&rows, &inputs.classes, "validation")).expect("serialisable");
    }
    if val_cases.is_empty() {
        // Nothing held out (few labels): say how well the model fits its labelled cases. That
        // is not a test, and is recorded apart from `validation` so nobody reads it as one.
        reporter.stage("fit", train_cases.len() as u64, "segmenting the labelled training cases (fit, not a test)")?;
        let per_case = evaluate_sources(&model, train_cases, Some(reporter))?;
        let rows: Vec<Vec<ClassMetrics>> = per_case.iter().map(|(_, m)| m.clone()).collect();
        let summary = summarize(&rows, &inputs.classes);
        let mean_dice = summary.iter().map(|s| s.dice_mean).sum::<f64>() / summary.len().max(1) as f64;
        reporter.message(&format!("fit on the {} labelled training cases: mean Dice {:.4} (not a test)", train_cases.len(), mean_dice));
        model.meta.training["training_fit"] = serde_json::json!({
            "mean_dice": mean_dice,
            "classes": summary,
            "note": "Dice on the labelled cases the model was trained on: how well it fits them, not a test",
        });
        model.meta.training["class_check"] = serde_json::to_value(ClassCheck::new(&rows, &inputs.classes, "fit")).expect("serialisable");
    }
    if let Some(w) = ClassCheck::from_training(&model.meta.training).and_then(|c| c.warning()) {
        // In the job's log and progress messages (GUIs show them); the CLI says it again at the end.
        reporter.message(&format!("WARNING: {w}"));
    }
    if let Some(ck) = &ck {
        let _ = std::fs::remove_file(&ck.path); // finished: the checkpoint has served
    }
    // Where the run's time went, stage by stage (wall clock), in the model and the log.
    let stage_seconds = reporter.stage_seconds(stages_mark);
    reporter.message(&format!(
        "time per stage: {}",
        stage_seconds.iter().map(|(n, t)| format!("{n} {t:.1} s")).collect::<Vec<_>>().join(", ")
    ));
    model.meta.training["stage_seconds"] = stage_seconds.iter().map(|(n, t)| serde_json::json!({"stage": n, "seconds": t})).collect();
    Ok(model)
}

/// File cases as pipeline sources.
pub fn sources(cases: &[Case]) -> Vec<CaseSource> {
    cases.iter().cloned().map(CaseSource::Files).collect()
}

/// Default work folder of an output model: `M.sfrmodel` -> `M.sfrmodel.work/`.
pub fn default_work_dir(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".work");
    PathBuf::from(s)
}
