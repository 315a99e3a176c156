//! The whole pipeline on small synthetic phantoms (every method, SFR on and off, SFR+),
//! determinism, cancellation, resume after a crash, bad input, and a reduced real-data run.
mod common;

use sfr::io::dataset::Dataset;
use sfr::io::nifti;
use sfr::job::{Job, Reporter};
use sfr::model::SfrModel;
use sfr::phantom::{phantom, write_dataset, PhantomSpec};
use sfr::pipeline::config::{Method, TrainConfig};
use sfr::pipeline::data::CaseSource;
use sfr::pipeline::retrain::{Batch, Trainer};
use sfr::pipeline::{evaluate_cases, sources, summarize, train, RunOptions, TrainInputs};
use sfr::pipeline::config::BnBatches;
use tch::{Device, Kind, Tensor};
use sfr::volume::{Geometry, Volume};
use sfr::Error;
use std::path::Path;
use std::time::{Duration, Instant};

fn dataset(dir: &Path, n: usize, classes: usize) -> Dataset {
    let spec = PhantomSpec { dims: [32, 32, 24], num_classes: classes, noise: 0.3 };
    write_dataset(dir, n, &spec, 7).unwrap();
    Dataset::open(dir).unwrap()
}

fn inputs(ds: &Dataset, labeled: usize) -> TrainInputs {
    let (l, u) = ds.split_first(labeled).unwrap();
    TrainInputs { labeled: sources(&l), unlabeled: sources(&u), classes: ds.labels.clone(), dataset_name: ds.name.clone() }
}

fn tiny(method: Method, sfr: bool) -> TrainConfig {
    let mut c = TrainConfig::test_tiny();
    c.method = method;
    c.sfr = sfr;
    c
}

/// Runs compared bit for bit fix the thread count: in auto mode (`threads: 0`) a change of
/// the machine's load between the runs could change it, and with it the order of
/// floating-point sums (`thread_count_changes_only_rounding` below).
const PINNED_THREADS: usize = 2;

/// The name of the first V-Net tensor in which two models differ (None: bit-identical weights).
fn first_difference(a: &SfrModel, b: &SfrModel) -> Option<String> {
    let (da, db) = (a.net().state_dict(), b.net().state_dict());
    assert_eq!(da.iter().map(|(k, _)| k).collect::<Vec<_>>(), db.iter().map(|(k, _)| k).collect::<Vec<_>>(), "the models have other tensors");
    da.into_iter().zip(db).find(|((_, x), (_, y))| !x.equal(y)).map(|((k, _), _)| k)
}

fn quiet() -> Reporter {
    Reporter::detached(None)
}

/// libtorch's random generator is global to the process: tests that train hold this lock so
/// that a concurrently running test cannot draw from it in between (which would make the
/// determinism test fail for a reason outside the library).
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn every_method_trains_with_and_without_sfr() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 6, 3);
    let inp = inputs(&ds, 2);
    let mut plus = tiny(Method::MeanTeacher, true);
    plus.sfr_plus.enabled = true;
    plus.sfr_plus.tau = 0.0; // every sample counts as confident: exercises the absorbing path
    // ...which the pseudo-label guard would close: 10 SAM iterations make no plausible labels
    plus.vnet.pseudo_label_guard = 0.0;
    let runs = [tiny(Method::Supervised, false), tiny(Method::MeanTeacher, false), tiny(Method::Acmt, true), tiny(Method::SelfTraining, true), plus];
    for cfg in runs {
        let model = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
        assert_eq!(model.meta.training["method"], cfg.method.name());
        assert_eq!(model.meta.training["sfr"], cfg.sfr);
        assert_eq!(model.num_classes(), 3);
        if cfg.sfr_plus.enabled {
            assert_eq!(model.meta.training["sam"]["confident_samples"], 4);
        }
    }
}

/// Pseudo-labels written by one SFR run (`write_pseudo_labels`) and read back by another
/// (`pseudo_labels_from`) train exactly the V-Net of the run that made them: one SAM stage can
/// serve several re-training methods. The folder is really read (a changed pseudo-label changes
/// the model), and a missing file, SFR off or SFR+ are clear errors.
#[test]
fn pseudo_labels_from_a_folder_train_the_same_model() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 4, 2);
    let inp = inputs(&ds, 2);
    let mut cfg = tiny(Method::MeanTeacher, true);
    cfg.threads = PINNED_THREADS;
    cfg.vnet.pseudo_label_guard = 0.0; // 10 SAM iterations: let every pseudo-label train
    let work = d.path().join("work");
    let written = train(&cfg, &inp, &RunOptions { work_dir: Some(work.clone()), write_pseudo_labels: true, ..Default::default() }, &quiet()).unwrap();
    let dir = work.join("pseudo");
    let from = |dir: &Path| RunOptions { pseudo_labels_from: Some(dir.to_path_buf()), ..Default::default() };
    let read = train(&cfg, &inp, &from(&dir), &quiet()).unwrap();
    assert_eq!(read.meta.training["sam"]["pseudo_labels_from"], dir.display().to_string());
    assert_eq!(read.meta.training["pseudo_label_guard"]["kept"], 2);
    assert_eq!(first_difference(&written, &read), None, "the run that made the pseudo-labels and the run that read them differ");
    // Another pseudo-label in the folder: another model.
    let unl = &ds.training[2].id;
    let path = dir.join(format!("{unl}_pseudo.nii.gz"));
    let mut lab = nifti::read(&path).unwrap().cast::<u8>();
    lab.data.fill(0);
    lab.data[[12, 16, 16]] = 1;
    nifti::write(&path, &lab).unwrap();
    let changed = train(&cfg, &inp, &from(&dir), &quiet()).unwrap();
    assert!(first_difference(&written, &changed).is_some(), "a changed pseudo-label left the model unchanged: the folder was not read");
    // A missing pseudo-label names the file; SFR off and SFR+ are refused before any work.
    std::fs::remove_file(&path).unwrap();
    let err = train(&cfg, &inp, &from(&dir), &quiet()).err().expect("a missing pseudo-label was accepted").to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("no pseudo-label"), "{err}");
    let mut off = cfg.clone();
    off.sfr = false;
    let err = train(&off, &inp, &from(&dir), &quiet()).err().expect("pseudo-labels without SFR were accepted").to_string();
    assert!(err.contains("SFR on"), "{err}");
    let mut plus = cfg.clone();
    plus.sfr_plus.enabled = true;
    let err = train(&plus, &inp, &from(&dir), &quiet()).err().expect("SFR+ from a folder was accepted").to_string();
    assert!(err.contains("SFR+"), "{err}");
}

/// `sam.match_labeled_fraction` in a whole run: each written pseudo-label is the argmax one
/// grown, only into voxels SAM called background with probability below the cap, until it covers
/// the labelled cases' mean foreground fraction (or no such voxel is left).
#[test]
fn pseudo_labels_grow_to_the_labelled_cases_fraction() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 5, 3);
    let inp = inputs(&ds, 2);
    let mut cfg = tiny(Method::MeanTeacher, true);
    cfg.threads = PINNED_THREADS;
    cfg.vnet.iterations = 2;
    let run_with = |grow: bool, pieces: bool, work: &Path| {
        let mut c = cfg.clone();
        c.sam.match_labeled_fraction = grow;
        c.sam.largest_component = pieces;
        train(&c, &inp, &RunOptions { work_dir: Some(work.to_path_buf()), write_pseudo_labels: true, ..Default::default() }, &quiet()).unwrap();
    };
    let run = |grow: bool, work: &Path| run_with(grow, false, work);
    let (argmax_dir, grown_dir) = (d.path().join("argmax"), d.path().join("grown"));
    run(false, &argmax_dir);
    run(true, &grown_dir);
    let fraction = |l: &ndarray::Array3<u8>| l.iter().filter(|&&v| v > 0).count() as f64 / l.len() as f64;
    let labelled: Vec<f64> = ds.training[..2].iter().map(|c| fraction(&nifti::read(c.label.as_ref().unwrap()).unwrap().cast::<u8>().data)).collect();
    let target = labelled.iter().sum::<f64>() / 2.0;
    let mut grown_any = false;
    for case in &ds.training[2..] {
        let read = |dir: &Path, what: &str| nifti::read(dir.join("pseudo").join(format!("{}_{what}.nii.gz", case.id))).unwrap();
        let before = read(&argmax_dir, "pseudo").cast::<u8>().data;
        let after = read(&grown_dir, "pseudo").cast::<u8>().data;
        // The confidence map is the max class probability: SAM's background probability where
        // the argmax label is background.
        let confidence = read(&argmax_dir, "confidence").cast::<f32>().data;
        let mut room = 0;
        for ((&b, &a), &c) in before.iter().zip(after.iter()).zip(confidence.iter()) {
            if b != a {
                assert!(b == 0 && a > 0 && c < sfr::pipeline::sam_stage::MATCH_FRACTION_MAX_BACKGROUND, "{}: a voxel went {b} -> {a} at background probability {c}", case.id);
                grown_any = true;
            } else if a == 0 && c < sfr::pipeline::sam_stage::MATCH_FRACTION_MAX_BACKGROUND {
                room += 1;
            }
        }
        let n = after.len() as f64;
        let (f0, f1) = (fraction(&before), fraction(&after));
        if f0 >= target {
            assert_eq!(before, after, "{}: a pseudo-label already at {f0} of the volume (labelled {target}) was changed", case.id);
        } else {
            // Grown to the target (to the voxel), or as far as the cap allows.
            assert!((f1 - target).abs() <= 1.0 / n || (f1 < target && room == 0), "{}: {f0} -> {f1}, labelled {target}, {room} voxels could still grow", case.id);
        }
    }
    assert!(grown_any, "no pseudo-label grew: the test does not exercise the growth (pseudo-labels above the labelled fraction {target})");
    // `sam.largest_component` after the growth: the grown label's largest pieces.
    let pieces_dir = d.path().join("pieces");
    run_with(true, true, &pieces_dir);
    let mut removed_any = false;
    for case in &ds.training[2..] {
        let read = |dir: &Path| nifti::read(dir.join("pseudo").join(format!("{}_pseudo.nii.gz", case.id))).unwrap().cast::<u8>().data;
        let mut want = read(&grown_dir);
        removed_any |= sfr::infer::keep_largest_components(&mut want, 3) > 0;
        assert_eq!(read(&pieces_dir), want, "{}: not the grown pseudo-label's largest pieces", case.id);
    }
    assert!(removed_any, "every grown pseudo-label was one piece per class: largest_component is not exercised");
}

/// Same seed, same data: the same model (CPU).
#[test]
fn training_is_deterministic_for_a_seed() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 4, 2);
    let inp = inputs(&ds, 2);
    let mut cfg = tiny(Method::MeanTeacher, true);
    cfg.threads = PINNED_THREADS;
    let a = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
    let b = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
    assert_eq!(first_difference(&a, &b), None, "two runs with the same seed differ");
}

#[test]
fn cancellation_stops_within_seconds_and_writes_nothing() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 4, 2);
    let inp = inputs(&ds, 2);
    let mut cfg = tiny(Method::MeanTeacher, false);
    cfg.vnet.iterations = 100_000;
    let out = d.path().join("never.sfrmodel");
    let out2 = out.clone();
    let mut job = Job::spawn(None, move |r: &Reporter| {
        let m = train(&cfg, &inp, &RunOptions::default(), r)?;
        m.save(&out2)?;
        Ok(())
    })
    .unwrap();
    let t = Instant::now();
    while job.progress().stage != "retrain" || job.progress().step < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    job.cancel();
    assert!(matches!(job.wait(), Err(Error::Cancelled)));
    assert!(asked.elapsed() < Duration::from_secs(5), "cancel took {:?}", asked.elapsed());
    assert!(!out.exists());
}

/// A mean-teacher run of 30 iterations that checkpoints every 10, on pinned threads.
fn resumable(sfr: bool) -> TrainConfig {
    let mut cfg = tiny(Method::MeanTeacher, sfr);
    cfg.vnet.iterations = 30;
    cfg.checkpoint_every = 10;
    cfg.threads = PINNED_THREADS;
    cfg
}

/// "Crashes" a run after re-training iteration 15 (cancels it there); returns its checkpoint.
fn crash_after_iteration_15(cfg: &TrainConfig, inp: &TrainInputs, opts: &RunOptions) -> std::path::PathBuf {
    let mut job = {
        let (cfg, inp_l, inp_u, classes) = (cfg.clone(), inp.labeled.clone(), inp.unlabeled.clone(), inp.classes.clone());
        let opts = opts.clone();
        Job::spawn(None, move |r: &Reporter| {
            let inp = TrainInputs { labeled: inp_l, unlabeled: inp_u, classes, dataset_name: String::new() };
            train(&cfg, &inp, &opts, r)
        })
        .unwrap()
    };
    while !(job.progress().stage == "retrain" && job.progress().step >= 15) {
        assert!(!job.is_finished(), "the run ended before iteration 15");
        std::thread::sleep(Duration::from_millis(5));
    }
    job.cancel();
    assert!(job.wait().is_err());
    let ck = opts.work_dir.as_ref().unwrap().join("retrain.ckpt.safetensors");
    assert!(ck.exists(), "no checkpoint after 15 iterations with checkpoint_every = 10");
    ck
}

/// The pseudo-labels are part of a run: a checkpoint of a run on SAM's pseudo-labels is not
/// continued on a folder's, nor one on a folder's after the folder changed.
#[test]
fn resume_refuses_other_pseudo_labels() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 4, 2);
    let inp = inputs(&ds, 2);
    let mut cfg = resumable(true);
    cfg.vnet.pseudo_label_guard = 0.0; // 10 SAM iterations: let every pseudo-label train
    let work = d.path().join("work");
    let sam_run = RunOptions { work_dir: Some(work.clone()), write_pseudo_labels: true, ..Default::default() };
    let ck = crash_after_iteration_15(&cfg, &inp, &sam_run);
    let dir = d.path().join("pseudo");
    std::fs::rename(work.join("pseudo"), &dir).unwrap();
    let from_folder = RunOptions { work_dir: Some(work.clone()), pseudo_labels_from: Some(dir.clone()), ..Default::default() };
    let refused = |opts: &RunOptions, what: &str| {
        let err = train(&cfg, &inp, &RunOptions { resume: true, ..opts.clone() }, &quiet()).err().unwrap_or_else(|| panic!("{what} was resumed")).to_string();
        assert!(err.contains("another configuration or other cases"), "{what}: {err}");
        assert!(ck.exists(), "a refused resume keeps the checkpoint");
    };
    refused(&from_folder, "a SAM run's checkpoint with a folder's pseudo-labels");
    std::fs::remove_file(&ck).unwrap();
    assert_eq!(crash_after_iteration_15(&cfg, &inp, &from_folder), ck);
    let unl = &ds.training[2].id;
    let path = dir.join(format!("{unl}_pseudo.nii.gz"));
    let mut lab = nifti::read(&path).unwrap().cast::<u8>();
    lab.data[[12, 16, 16]] = 1 - lab.data[[12, 16, 16]];
    nifti::write(&path, &lab).unwrap();
    refused(&from_folder, "a folder run's checkpoint after a pseudo-label changed");
    lab.data[[12, 16, 16]] = 1 - lab.data[[12, 16, 16]];
    nifti::write(&path, &lab).unwrap();
    let resumed = train(&cfg, &inp, &RunOptions { resume: true, ..from_folder.clone() }, &quiet()).unwrap();
    let straight = train(&cfg, &inp, &RunOptions { pseudo_labels_from: Some(dir), ..Default::default() }, &quiet()).unwrap();
    assert_eq!(first_difference(&resumed, &straight), None, "the resumed folder run differs from the uninterrupted one");
}

/// A run killed mid-way resumes from its checkpoint and finishes with exactly the model of an
/// uninterrupted run (student, EMA teacher, momentum and every random draw are restored); a
/// checkpoint of another configuration is refused.
#[test]
fn resume_continues_from_the_checkpoint() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 4, 2);
    let inp = inputs(&ds, 2);
    let cfg = resumable(false);
    let work = d.path().join("work");
    let opts = RunOptions { work_dir: Some(work.clone()), ..Default::default() };
    let ck = crash_after_iteration_15(&cfg, &inp, &opts);
    let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let m2 = messages.clone();
    let r = Reporter::detached(Some(Box::new(move |p| m2.lock().unwrap().push(p.message.clone()))));
    // Another configuration must not continue this checkpoint.
    let mut other = cfg.clone();
    other.seed += 1;
    let err = match train(&other, &inp, &RunOptions { resume: true, ..opts.clone() }, &quiet()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a checkpoint of another seed was resumed"),
    };
    assert!(err.contains("another configuration"), "{err}");
    assert!(ck.exists(), "a refused resume keeps the checkpoint");
    let model = train(&cfg, &inp, &RunOptions { resume: true, ..opts }, &r).unwrap();
    assert!(messages.lock().unwrap().iter().any(|m| m.contains("resumed re-training at iteration 10")));
    assert!(!ck.exists(), "a finished run removes its checkpoint");
    assert_eq!(model.meta.training["method"], "mean-teacher");
    let straight = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
    assert_eq!(first_difference(&model, &straight), None, "the resumed and the uninterrupted run differ");
}

/// A dataset of mixed spacings trains at one: the median (or `spacing` when set), recorded in
/// the model; a thick-slice case is resampled (and said so), and the model segments scans at
/// any spacing onto their own grid.
#[test]
fn mixed_spacings_train_at_one_spacing() {
    let _serial = serial();
    let spec = PhantomSpec { dims: [24, 24, 16], num_classes: 2, noise: 0.2 };
    let classes = sfr::limits::Classes::new("labels", [(0, "background".into()), (1, "organ".into())].into()).unwrap();
    // Three 1 mm cases and one with every other slice (2 mm along z).
    let mut labeled = vec![];
    for i in 0..4u64 {
        let (img, lab) = phantom(i + 1, &spec);
        let (img, lab) = if i == 3 {
            let g = Geometry { spacing: [1.0, 1.0, 2.0], ..img.geometry };
            let thick = |d: &ndarray::Array3<f32>| d.slice(ndarray::s![..;2, .., ..]).to_owned();
            (Volume::new(thick(&img.data), g), Volume::new(thick(&lab.data.mapv(|v| v as f32)), g).cast::<f64>())
        } else {
            (img, lab.cast::<f64>())
        };
        labeled.push(memory_case(&format!("c{i}"), img, Some(lab)));
    }
    let inp = TrainInputs { labeled, unlabeled: vec![], classes, dataset_name: "t".into() };
    let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = said.clone();
    let r = Reporter::detached(Some(Box::new(move |p| s2.lock().unwrap().push(p.message.clone()))));
    let mut cfg = tiny(Method::Supervised, false);
    cfg.threads = PINNED_THREADS;
    let m = train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    assert_eq!(m.meta.spacing, [1.0, 1.0, 1.0]);
    assert!(said.lock().unwrap().iter().any(|t| t.contains("resampling 1 of 4 training volumes")), "{:?}", said.lock().unwrap());
    // An explicit spacing: every case resampled, the model at that spacing.
    cfg.spacing = Some([2.0, 2.0, 2.0]);
    said.lock().unwrap().clear();
    let m2 = train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    assert_eq!(m2.meta.spacing, [2.0, 2.0, 2.0]);
    assert!(said.lock().unwrap().iter().any(|t| t.contains("resampling 4 of 4 training volumes")));
    let (img, _) = phantom(9, &spec);
    let (labels, probs) = m2.segment(&img, None).unwrap();
    assert_eq!(labels.geometry, img.geometry);
    assert_eq!(labels.data.shape(), img.data.shape());
    assert_eq!(&probs.shape()[1..], img.data.shape());
    // No spacing, patch_context 1, on phantoms twice as large (a foreground wider than the
    // smallest patch the V-Net takes, 16³): the median, coarsened until one patch spans the
    // labelled foreground's median extent along every axis, and said so.
    cfg.spacing = None;
    cfg.patch_context = 1.0;
    said.lock().unwrap().clear();
    let big = PhantomSpec { dims: [48, 48, 32], ..spec };
    let labeled: Vec<_> = (0..2u64).map(|i| {
        let (img, lab) = phantom(i + 1, &big);
        memory_case(&format!("b{i}"), img, Some(lab.cast::<f64>()))
    }).collect();
    let inp = TrainInputs { labeled, unlabeled: vec![], classes: inp.classes.clone(), dataset_name: "t".into() };
    let m3 = train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    let extents: Vec<[f64; 3]> = inp.labeled.iter().map(|c| {
        let (_, lab, _, _) = c.read().unwrap();
        let lab = lab.unwrap();
        sfr::pipeline::plan::foreground_extent_mm(&lab.data, lab.geometry.spacing).unwrap()
    }).collect();
    let fg = [0, 1, 2].map(|a| sfr::pipeline::plan::median(extents.iter().map(|e| e[a]).collect()).unwrap());
    assert!((0..3).any(|a| 16.0 < fg[a]), "the phantom's foreground {fg:?} mm fits a 16 mm patch: nothing to coarsen");
    let sp = m3.meta.spacing;
    assert!((0..3).all(|a| sp[a] >= 1.0 && 16.0 * sp[a] >= fg[a]), "spacing {sp:?} for a foreground of {fg:?} mm");
    assert!((0..3).any(|a| 16.0 * (sp[a] - 0.05) < fg[a]), "{sp:?} is not the finest 0.05 mm step that spans {fg:?} mm");
    assert_eq!(m3.meta.training["spacing_from"], "the median spacing, coarsened so that one patch spans patch_context of the foreground");
    assert!(said.lock().unwrap().iter().any(|t| t.contains("coarsened so that one [16, 16, 16] patch spans at least 100%")), "{:?}", said.lock().unwrap());
    // A patch budget: training plans the patch (and its half stride) with the plan's code, at
    // the plan's spacing, says so, and the model carries them: here 16×16×32 voxels' worth,
    // long along the axis the foreground needs.
    cfg.patch_context = 0.5;
    cfg.patch_budget = 16 * 16 * 32;
    said.lock().unwrap().clear();
    let m4 = train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    let fov = big.dims.map(|d| d as f64);
    let want = sfr::pipeline::plan::plan_grid(&cfg, [1.0; 3], Some(fg), fov);
    assert_eq!((m4.meta.patch, m4.meta.inference.stride, m4.meta.spacing), (want.patch, want.stride, want.spacing));
    assert!(want.patch.iter().product::<usize>() == 8192 && want.patch != cfg.patch, "{want:?}");
    assert_eq!(m4.meta.training["patch_from"], "planned within patch_budget voxels to span the foreground");
    assert!(said.lock().unwrap().iter().any(|t| t.contains(&format!("patch {:?} voxels, stride {:?}: planned within 8192 voxels", want.patch, want.stride))), "{:?}", said.lock().unwrap());
    cfg.patch_budget = 0;
    cfg.patch_context = 0.0;
    // A spacing that is not a spacing is refused before any work.
    cfg.spacing = Some([1.0, 0.0, 1.0]);
    let err = train(&cfg, &inp, &RunOptions::default(), &quiet()).err().unwrap().to_string();
    assert!(err.contains("spacing[1]"), "{err}");
}

/// CT: one intensity window from the labelled foreground (nnU-Net's clip to its 0.5-99.5th
/// percentiles, then its mean and std), recorded in the model file and applied to every scan,
/// so that a scan's air, however much and however dark, does not move its tissue values (a
/// per-volume z-score would).
#[test]
fn ct_normalisation_is_one_window_from_the_labelled_foreground() {
    let _serial = serial();
    let spec = PhantomSpec { dims: [24, 24, 16], num_classes: 2, noise: 0.2 };
    let classes = sfr::limits::Classes::new("labels", [(0, "background".into()), (1, "organ".into())].into()).unwrap();
    // Phantoms in Hounsfield-like units, each with a slab of air of its own thickness.
    let hu = |seed: u64, air: usize| {
        let (img, lab) = phantom(seed, &spec);
        let mut d = img.data.mapv(|v| v * 300.0 - 100.0);
        d.slice_mut(ndarray::s![.., ..air, ..]).fill(-1000.0);
        (Volume::new(d, img.geometry), lab)
    };
    let cases: Vec<_> = (0..3u64).map(|i| hu(i + 1, 1 + i as usize)).collect();
    let mut fg: Vec<f64> = cases.iter().flat_map(|(i, l)| i.data.iter().zip(l.data.iter()).filter(|(_, &c)| c > 0).map(|(&v, _)| v as f64).collect::<Vec<_>>()).collect();
    let labeled = cases.iter().enumerate().map(|(k, (i, l))| memory_case(&format!("ct{k}"), i.clone(), Some(l.cast::<f64>()))).collect();
    let inp = TrainInputs { labeled, unlabeled: vec![], classes, dataset_name: "t".into() };
    let mut cfg = tiny(Method::Supervised, false);
    cfg.threads = PINNED_THREADS;
    cfg.normalization = sfr::pipeline::config::NormalizationChoice::Ct;
    let m = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
    assert_eq!(m.meta.normalization, "ct-foreground");
    // A NaN voxel in a labelled case is refused, naming the case.
    let mut bad = cases[1].0.clone();
    bad.data[[0, 0, 0]] = f32::NAN;
    let nan_inp = TrainInputs { labeled: vec![memory_case("nan-case", bad, Some(cases[1].1.cast::<f64>()))], unlabeled: vec![], classes: inp.classes.clone(), dataset_name: "t".into() };
    let err = train(&cfg, &nan_inp, &RunOptions::default(), &quiet()).err().unwrap().to_string();
    assert!(err.contains("nan-case") && err.contains("NaN"), "{err}");
    let w = m.meta.normalization_window.expect("a CT model records its window");
    // The window, computed here on its own: nearest-rank percentiles and the plain mean.
    fg.sort_by(f64::total_cmp);
    let last = (fg.len() - 1) as f64;
    let (lo, hi) = (fg[(0.005 * last).floor() as usize], fg[(0.995 * last).ceil() as usize]);
    let mean = fg.iter().sum::<f64>() / fg.len() as f64;
    assert_eq!(w.clip, [lo as f32, hi as f32]);
    assert!((w.mean - mean).abs() < 1e-6 * mean.abs().max(1.0), "{} vs {mean}", w.mean);
    assert!(lo > -1000.0, "the window {:?} must clip the air away", w.clip);
    // The file keeps it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ct.sfrmodel");
    m.save(&path).unwrap();
    let mut back = sfr::model::SfrModel::load(&path, Device::Cpu).unwrap();
    assert_eq!(back.meta.normalization_window, Some(w));
    // A scan whose air is darker: the same probabilities to the bit.
    let (scan, _) = hu(9, 3);
    let mut darker = scan.clone();
    darker.data.mapv_inplace(|v| if v < w.clip[0] { -3000.0 } else { v });
    assert_ne!(scan.data, darker.data);
    assert_eq!(back.predict(&scan, None).unwrap(), back.predict(&darker, None).unwrap());
    // Under the per-volume z-score the same change moves every voxel's input: not vacuous.
    back.meta.normalization = "zscore-per-volume".into();
    back.meta.normalization_window = None;
    assert_ne!(back.predict(&scan, None).unwrap(), back.predict(&darker, None).unwrap());
    // `auto` without a declared modality (in-memory cases) is the z-score, with a warning when
    // the images look like CT (air at -1000); an explicit "zscore" is not warned about.
    let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = said.clone();
    let r = Reporter::detached(Some(Box::new(move |p| s2.lock().unwrap().push(p.message.clone()))));
    let warned = |said: &std::sync::Mutex<Vec<String>>| said.lock().unwrap().iter().any(|m| m.contains("nothing declares the scans CT"));
    cfg.normalization = sfr::pipeline::config::NormalizationChoice::Auto;
    let z = train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    assert_eq!((z.meta.normalization.as_str(), z.meta.normalization_window), ("zscore-per-volume", None));
    assert!(warned(&said), "{:?}", said.lock().unwrap());
    said.lock().unwrap().clear();
    cfg.normalization = sfr::pipeline::config::NormalizationChoice::Zscore;
    train(&cfg, &inp, &RunOptions::default(), &r).unwrap();
    assert!(!warned(&said), "{:?}", said.lock().unwrap());
}

/// Auto threads (`sfr::threads`) may change the thread count during a run. That must change
/// the result only by the order of floating-point sums: libtorch's random draws (dropout
/// masks, the teacher's noise, initialisation) must not depend on it, and a training step from
/// the same weights must make the same update up to rounding. (Over many steps the rounding
/// differences grow as any perturbation does: at test-tiny sizes, scaling one weight tensor by
/// 1 + 1e-6 changed the first update by ~1%, while 1 vs 2 threads changed the convolution
/// kernels' updates by at most ~2e-4.)
#[test]
fn thread_count_changes_only_rounding() {
    let _serial = serial();
    let draws = |threads: usize| {
        sfr::threads::configure(threads);
        tch::manual_seed(11);
        let x = Tensor::ones([4, 64, 8, 8, 8], (Kind::Float, Device::Cpu));
        [x.feature_dropout(0.5, true), x.dropout(0.5, true), Tensor::randn([1 << 16], (Kind::Float, Device::Cpu)), Tensor::rand([1 << 16], (Kind::Float, Device::Cpu))]
    };
    let (a, b) = (draws(1), draws(2));
    assert!(a.iter().zip(&b).all(|(x, y)| x.equal(y)), "random draws depend on the thread count");

    // One mean-teacher step (dropout, the teacher's noise, EMA) from the same weights and batch.
    let step = |threads: usize| {
        sfr::threads::configure(threads);
        let mut cfg = TrainConfig::test_tiny();
        cfg.method = Method::MeanTeacher;
        let mut t = Trainer::new(&cfg, 3, Device::Cpu).unwrap();
        let before: Vec<Tensor> = t.net.state_dict().into_iter().map(|(_, v)| v.copy()).collect();
        tch::manual_seed(100);
        let batch = Batch {
            images: Tensor::randn([4, 1, 16, 16, 16], (Kind::Float, Device::Cpu)),
            labels: Tensor::randint(3, [2, 16, 16, 16], (Kind::Int64, Device::Cpu)),
            sam_pseudo: None,
            own_pseudo: None,
        };
        let loss = t.step(&batch, 0).unwrap();
        let after: Vec<(String, Tensor)> = t.net.state_dict();
        (loss, before, after)
    };
    let (one, two) = (step(1), step(2));
    sfr::threads::configure(0);
    assert!((one.0 - two.0).abs() <= 1e-5 * one.0.abs().max(1.0), "losses {} vs {}", one.0, two.0);
    let mut worst = 0f64;
    for ((init, (k, a)), (_, b)) in one.1.iter().zip(&one.2).zip(&two.2) {
        if a.kind() != Kind::Float {
            assert!(a.equal(b), "{k}");
            continue;
        }
        let update = (a - init).abs().max().double_value(&[]);
        let d = (a - b).abs().max().double_value(&[]);
        // Rounding of the weight itself is the floor: a bias before BatchNorm gets a gradient
        // of ~0, so its whole update is rounding.
        let floor = 1e-6 * a.abs().max().double_value(&[]);
        if a.dim() == 5 {
            worst = worst.max(d / update); // convolution kernels: the bulk of the update
        }
        assert!(d <= 1e-3 * update + floor, "{k}: 1 and 2 threads made updates that differ by {d:.3e} (the update is {update:.3e})");
    }
    eprintln!("1 vs 2 threads, one mean-teacher step: losses {} vs {}, convolution kernels' updates differ by at most {worst:.1e} of their size", one.0, two.0);
}

fn memory_case(id: &str, img: Volume<f32>, lab: Option<Volume<f64>>) -> CaseSource {
    CaseSource::memory(id, img, lab.map(|l| l.cast::<u8>()))
}

#[test]
fn bad_input_is_a_clear_error() {
    let _serial = serial();
    let spec = PhantomSpec { dims: [20, 20, 16], num_classes: 2, noise: 0.2 };
    let (img, lab) = phantom(1, &spec);
    let labf = lab.cast::<f64>();
    let classes = sfr::limits::Classes::new("labels", [(0, "background".into()), (1, "organ".into())].into()).unwrap();
    let cfg = tiny(Method::Supervised, false);
    let run = |labeled: Vec<CaseSource>, unlabeled: Vec<CaseSource>| {
        let inp = TrainInputs { labeled, unlabeled, classes: classes.clone(), dataset_name: "t".into() };
        train(&cfg, &inp, &RunOptions::default(), &quiet()).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(run(vec![], vec![]).contains("zero labelled"));
    // label with another shape
    let small = Volume::new(ndarray::Array3::<f64>::zeros((16, 20, 19)), img.geometry);
    assert!(run(vec![memory_case("a", img.clone(), Some(small))], vec![]).contains("dims"));
    // label geometry that differs
    let moved = Volume::new(labf.data.clone(), Geometry { origin: [100.0, 0.0, 0.0], ..labf.geometry });
    assert!(run(vec![memory_case("b", img.clone(), Some(moved))], vec![]).contains("geometry"));
    // a class that is not declared
    let mut three = labf.clone();
    three.data[[0, 0, 0]] = 3.0;
    assert!(run(vec![memory_case("c", img.clone(), Some(three))], vec![]).contains("label value 3"));
    // NaN in an unlabelled image
    let mut nan = img.clone();
    nan.data[[1, 1, 1]] = f32::NAN;
    assert!(run(vec![memory_case("d", img.clone(), Some(labf.clone()))], vec![memory_case("e", nan, None)]).contains("NaN"));
    // a labelled case without a label
    assert!(run(vec![memory_case("f", img.clone(), None)], vec![]).contains("no label"));
    // missing file
    let missing = sfr::io::dataset::Case { id: "g".into(), image: "/nonexistent/g.nii.gz".into(), label: Some("/nonexistent/g_l.nii.gz".into()) };
    assert!(run(vec![CaseSource::Files(missing)], vec![]).contains("/nonexistent/g.nii.gz"));
    // volumes smaller than the patch are padded, not an error
    let (tiny_img, tiny_lab) = phantom(2, &PhantomSpec { dims: [10, 12, 8], num_classes: 2, noise: 0.2 });
    assert_eq!(run(vec![memory_case("h", tiny_img, Some(tiny_lab.cast()))], vec![]), "");
}

/// Real data, reduced: a few hippocampus cases, a short supervised run; the trained V-Net must
/// beat an untrained one by a clear margin on held-out cases.
#[test]
fn real_hippocampus_training_beats_untrained() {
    let _serial = serial();
    let Some(root) = common::shared_data() else { return };
    let ds = Dataset::open(root.join("hippocampus")).unwrap();
    let labeled: Vec<_> = ds.training[..4].to_vec();
    let held_out: Vec<_> = ds.training[190..196].to_vec();
    let mut cfg = TrainConfig::cpu_small();
    cfg.method = Method::Supervised;
    cfg.sfr = false;
    cfg.validation_cases = Some(0);
    cfg.checkpoint_every = 0;
    cfg.vnet.iterations = 300;
    let inp = TrainInputs { labeled: sources(&labeled), unlabeled: vec![], classes: ds.labels.clone(), dataset_name: ds.name.clone() };
    let untrained = {
        let mut c = cfg.clone();
        c.vnet.iterations = 1;
        train(&c, &inp, &RunOptions::default(), &quiet()).unwrap()
    };
    let t = Instant::now();
    let trained = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
    let mean_dice = |m: &SfrModel| {
        let rows: Vec<_> = evaluate_cases(m, &held_out, None).unwrap().into_iter().map(|(_, r)| r).collect();
        let s = summarize(&rows, &ds.labels);
        s.iter().map(|c| c.dice_mean).sum::<f64>() / s.len() as f64
    };
    let (before, after) = (mean_dice(&untrained), mean_dice(&trained));
    eprintln!("hippocampus, 4 labelled, 300 iterations ({:.0} s): mean Dice untrained {before:.3}, trained {after:.3}", t.elapsed().as_secs_f64());
    assert!(after > before + 0.2, "trained {after:.3} vs untrained {before:.3}");
    // the model segments a real volume with its exact geometry
    let img = nifti::read(&held_out[0].image).unwrap().cast::<f32>();
    let (seg, _) = trained.segment(&img, None).unwrap();
    assert_eq!(seg.geometry, img.geometry);
    assert_eq!(seg.dims(), img.dims());
}

/// Issue 9's regression test on real data: unlabelled crops in the batch must not change how
/// the labelled loss trains the student. At one seed and one budget on hippocampus (4
/// labelled, 16 unlabelled, 10 held-out cases), a mean teacher with consistency weight 0 ends
/// with exactly supervised's weights (only BatchNorm's running statistics, which also see the
/// unlabelled crops, differ) and within 5 points of its mean Dice; the mean teacher with its
/// consistency is not more than 5 points below that. With BatchNorm statistics shared by
/// labelled and unlabelled crops (the old default, `vnet.batchnorm = "joint"`), the weights
/// differ from the first step — that collapse cost 51 points at 2000 iterations, while at this
/// budget Dice alone does not yet show it (README, "Mixed batches").
#[test]
fn real_hippocampus_mixed_batches_train_like_supervised() {
    let _serial = serial();
    let Some(root) = common::shared_data() else { return };
    let ds = Dataset::open(root.join("hippocampus")).unwrap();
    let held_out: Vec<_> = ds.training[190..200].to_vec();
    let inp = TrainInputs {
        labeled: sources(&ds.training[..4]),
        unlabeled: sources(&ds.training[4..20]),
        classes: ds.labels.clone(),
        dataset_name: ds.name.clone(),
    };
    let mut base = TrainConfig::cpu_small();
    base.sfr = false;
    base.validation_cases = Some(0);
    base.checkpoint_every = 0;
    base.vnet.iterations = 300;
    base.threads = PINNED_THREADS;
    let run = |method: Method, consistency: Option<f64>| {
        let mut cfg = base.clone();
        cfg.method = method;
        if let Some(w) = consistency {
            cfg.vnet.consistency = w;
        }
        let t = Instant::now();
        let m = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
        let rows: Vec<_> = evaluate_cases(&m, &held_out, None).unwrap().into_iter().map(|(_, r)| r).collect();
        let s = summarize(&rows, &ds.labels);
        let d = s.iter().map(|c| c.dice_mean).sum::<f64>() / s.len() as f64;
        eprintln!("{} consistency {}: mean Dice {d:.3} ({:.0} s)", method.name(), cfg.vnet.consistency, t.elapsed().as_secs_f64());
        (m, d)
    };
    let trained = |m: &SfrModel| -> Vec<(String, tch::Tensor)> {
        m.net().state_dict().into_iter().filter(|(k, _)| !k.contains("running_") && !k.contains("num_batches")).collect()
    };
    let (sup_model, sup) = run(Method::Supervised, None);
    let (mt0_model, mt0) = run(Method::MeanTeacher, Some(0.0));
    for ((k, a), (_, b)) in trained(&sup_model).iter().zip(&trained(&mt0_model)) {
        assert!(a.equal(b), "{k}: consistency 0 trained other weights than supervised");
    }
    let (_, mt) = run(Method::MeanTeacher, None);
    assert!(sup > 0.2, "supervised did not learn ({sup:.3}): the comparison would say nothing");
    assert!((mt0 - sup).abs() <= 0.05, "mean teacher with consistency 0: {mt0:.3}, supervised {sup:.3}");
    assert!(mt >= mt0 - 0.05, "mean teacher {mt:.3} below its consistency-0 run {mt0:.3}");
}

/// Issue 9's mechanism, pinned: with `separate` BatchNorm batches, a mean teacher whose
/// consistency weight is 0 trains the student exactly as supervised does (the unlabelled
/// crops change only the running statistics); with `joint` batches the labelled loss already
/// differs at the first step, through the batch statistics of the unlabelled crops.
#[test]
fn unlabelled_crops_do_not_change_supervised_training_with_separate_batchnorm() {
    // libtorch's generator is process-global: no other test may draw from it meanwhile
    let _serial = serial();
    let run = |method: Method, bn: BnBatches| -> (Vec<f64>, Vec<(String, Tensor)>) {
        let mut cfg = TrainConfig::test_tiny();
        cfg.method = method;
        cfg.vnet.consistency = 0.0;
        cfg.vnet.batchnorm = bn;
        let mut t = Trainer::new(&cfg, 3, Device::Cpu).unwrap();
        let mut losses = vec![];
        for it in 0..4 {
            // the same crops for every run; the labelled ones first, as the loop stacks them
            tch::manual_seed(100 + it as i64);
            let images = Tensor::randn([4, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
            let labels = Tensor::randint(3, [2, 16, 16, 16], (Kind::Int64, Device::Cpu));
            let with_unlabelled = Batch { images: images.shallow_clone(), labels: labels.shallow_clone(), sam_pseudo: None, own_pseudo: None };
            let batch = if method == Method::Supervised { Batch { images: images.narrow(0, 0, 2), ..with_unlabelled } } else { with_unlabelled };
            tch::manual_seed(it as i64); // dropout masks: the labelled forward draws first
            losses.push(t.step(&batch, it).unwrap());
        }
        let weights = t.net.state_dict().into_iter().filter(|(k, _)| !k.contains("running_") && !k.contains("num_batches")).collect();
        (losses, weights)
    };
    let (sup, sup_w) = run(Method::Supervised, BnBatches::Separate);
    let (sep, sep_w) = run(Method::MeanTeacher, BnBatches::Separate);
    let (joint, _) = run(Method::MeanTeacher, BnBatches::Joint);
    assert_eq!(sup, sep, "separate batches: the same losses as supervised");
    for ((k, a), (_, b)) in sup_w.iter().zip(&sep_w) {
        assert!(a.equal(b), "{k}: the student's weights differ from supervised's");
    }
    assert!((sup[0] - joint[0]).abs() > 1e-6, "joint batches: the unlabelled crops should move the first loss ({} vs {})", sup[0], joint[0]);
}

/// Issue 10: pseudo-labels that miss a class must not teach the V-Net that class away.
/// Phantoms with an organ (class 1) and a bud (class 2): 2 labelled cases and 10 unlabelled
/// whose "pseudo-labels" are their true labels, 9 of them with the organ labelled as bud — the
/// organ missing, as the anterior class was from SAM's hippocampus pseudo-labels — and 1
/// intact. They go through the pipeline's own guard step (`guard_pseudo_labels`, what `train`
/// does after the SAM stage) into re-training with the mean teacher. With the guard (the
/// default) the 9 are dropped, the intact one kept, and the organ's Dice on 4 held-out
/// phantoms is near the supervised run's; with the guard off the organ is erased.
///
/// The pseudo-label term is weighted 2 here so that it outweighs the labelled term clearly,
/// as 196 pseudo-labels did 3 labelled cases on hippocampus: at weight 1 and a budget of 150
/// iterations the tug of war on phantoms went either way (organ Dice without the guard 0.20
/// to 0.90 in 5 runs over 3 seeds and 6 or 10 unlabelled cases); at weight 2 it was 0.000 for
/// each of 4 seeds (1337, 1, 2, 3), with the guard 0.89–0.91, supervised 0.85–0.90. At 150
/// iterations an AMD EPYC's rounding left the guarded run at 0.599 against supervised 0.887
/// (not yet converged, not erased); at 300 it gave 0.912 against 0.908, unguarded 0.000.
#[test]
fn pseudo_labels_missing_a_class_do_not_teach_it_away() {
    use sfr::pipeline::data::{load_source, Sample};
    use sfr::pipeline::guard::guard_pseudo_labels;
    use sfr::pipeline::retrain::{predict_labels, retrain, UnlabeledCase};
    let _serial = serial();
    let t = Instant::now();
    // One thread, as `--threads 1` would set (`retrain` is called without `train`), restored after.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let spec = PhantomSpec { dims: [32, 32, 24], num_classes: 3, noise: 0.3 };
    let classes = sfr::limits::Classes::new("labels", [(0, "background".into()), (1, "organ".into()), (2, "bud".into())].into()).unwrap();
    let case = |seed: u64| {
        let (img, lab) = phantom(seed, &spec);
        (load_source(&CaseSource::memory(format!("p{seed}"), img, None), 3).unwrap(), lab.data)
    };
    let labeled: Vec<Sample> = (0..2)
        .map(|s| {
            let (sample, lab) = case(s);
            Sample { label: Some(lab), ..sample }
        })
        .collect();
    let (unlabeled, truth): (Vec<Sample>, Vec<_>) = (10..20).map(case).unzip();
    let pseudo: Vec<_> = truth.iter().enumerate().map(|(i, l)| if i == 0 { l.clone() } else { l.mapv(|v| if v == 1 { 2 } else { v }) }).collect();
    let test: Vec<_> = (100..104).map(case).collect();
    let organ_dice = |cfg: &TrainConfig, unl: &[UnlabeledCase], absorbed: Vec<Sample>| {
        let mut lab = labeled.clone();
        lab.extend(absorbed);
        let (_vs, net) = retrain(cfg, 3, &lab, unl, Device::Cpu, &quiet(), None, false).unwrap();
        let dice: Vec<f64> = test
            .iter()
            .map(|(s, truth)| {
                let pred = predict_labels(&net, cfg, &s.image.view(), Device::Cpu).unwrap();
                let (p, r) = (pred.mapv(|v| v == 1), truth.mapv(|v| v == 1));
                let both = p.iter().zip(&r).filter(|(a, b)| **a && **b).count();
                2.0 * both as f64 / (p.iter().filter(|v| **v).count() + r.iter().filter(|v| **v).count()).max(1) as f64
            })
            .collect();
        dice.iter().sum::<f64>() / dice.len() as f64
    };
    let mut cfg = TrainConfig::test_tiny();
    cfg.vnet.iterations = 300;
    cfg.vnet.pseudo_label_weight = 2.0;
    let supervised = {
        let mut c = cfg.clone();
        c.method = Method::Supervised;
        c.sfr = false;
        let unl: Vec<UnlabeledCase> = unlabeled.iter().map(|s| UnlabeledCase { sample: s.clone(), sam_pseudo: None }).collect();
        organ_dice(&c, &unl, vec![])
    };
    let sfr_run = |guard: Option<f64>| {
        let mut c = cfg.clone();
        c.method = Method::MeanTeacher;
        c.sfr = true;
        if let Some(g) = guard {
            c.vnet.pseudo_label_guard = g;
        }
        let g = guard_pseudo_labels(&c, &classes, &labeled, unlabeled.clone(), pseudo.clone(), vec![false; unlabeled.len()], &quiet()).unwrap();
        (organ_dice(&c, &g.unlabeled, g.absorbed), g.record)
    };
    let (guarded, record) = sfr_run(None); // the preset's default: on
    let (unguarded, off) = sfr_run(Some(0.0));
    tch::set_num_threads(threads);
    eprintln!("organ Dice on 4 held-out phantoms: supervised {supervised:.3}, SFR with the guard {guarded:.3}, without {unguarded:.3} ({:.0} s)", t.elapsed().as_secs_f64());
    // The guard kept the intact pseudo-label, dropped the 9 without the organ, and said why.
    assert_eq!((record["enabled"].as_bool(), record["kept"].as_u64(), record["dropped"].as_u64()), (Some(true), Some(1), Some(9)), "{record}");
    assert_eq!(record["cases"][0]["kept"], true);
    assert!(record["cases"][1]["reasons"][0].as_str().unwrap().starts_with("class 1 absent"), "{record}");
    assert_eq!(off["dropped"].as_u64(), Some(0));
    assert!(supervised > 0.5, "supervised did not learn the organ ({supervised:.3}): the comparison would say nothing");
    assert!(guarded >= supervised - 0.1, "with the guard the organ's Dice {guarded:.3} should be near supervised's {supervised:.3}");
    assert!(unguarded < guarded - 0.4, "without the guard the organ's Dice {unguarded:.3} should be far below the guarded run's {guarded:.3}");
}

/// The regression test of the lost class: on the first 4 hippocampus cases, `cpu-small`'s
/// supervised V-Net with seeds 1 and 3 never predicted the anterior class (Dice 0 on every
/// held-out and training case) while posterior reached 80: the random head started with one
/// class predicted almost everywhere, and the anterior voxels' last-layer features all died
/// (no gradient ever reached them again). With the head starting at the class prior both seeds
/// learn both classes. Asserted on 10 held-out cases: every class above 50 Dice, and the
/// model's own training check passes.
#[test]
fn real_hippocampus_every_class_is_learnt_in_the_seeds_that_lost_one() {
    let _serial = serial();
    let Some(root) = common::shared_data() else { return };
    let ds = Dataset::open(root.join("hippocampus")).unwrap();
    let labeled: Vec<_> = ds.training[..4].to_vec();
    let held_out: Vec<_> = ds.training[150..160].to_vec();
    let inp = TrainInputs { labeled: sources(&labeled), unlabeled: vec![], classes: ds.labels.clone(), dataset_name: ds.name.clone() };
    for seed in [1, 3] {
        let mut cfg = TrainConfig::cpu_small();
        cfg.method = Method::Supervised;
        cfg.sfr = false;
        cfg.checkpoint_every = 0;
        cfg.seed = seed;
        let t = Instant::now();
        let model = train(&cfg, &inp, &RunOptions::default(), &quiet()).unwrap();
        let rows: Vec<_> = evaluate_cases(&model, &held_out, None).unwrap().into_iter().map(|(_, r)| r).collect();
        let dice: Vec<f64> = summarize(&rows, &ds.labels).iter().map(|c| c.dice_mean).collect();
        eprintln!("hippocampus, 4 labelled, seed {seed} ({:.0} s): held-out Dice per class {dice:.3?}", t.elapsed().as_secs_f64());
        let check = sfr::pipeline::class_check::ClassCheck::from_training(&model.meta.training).expect("every trained model is checked");
        assert!(check.failed().is_empty(), "seed {seed}: {:?}", check.warning());
        assert!(dice.iter().all(|&d| d > 0.5), "seed {seed}: a class is lost or weak on held-out cases: {dice:.3?}");
    }
}
