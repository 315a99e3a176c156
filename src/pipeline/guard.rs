//! The pseudo-label guard: a SAM pseudo-label whose class proportions are far outside those of
//! the labelled cases does not train the V-Net.
//!
//! Why: with few labels the pseudo-label term (weight `vnet.pseudo_label_weight`, on every
//! unlabelled crop) outvotes the labelled one. On hippocampus, 196 pseudo-labels of a SAM
//! trained from scratch that missed the anterior class taught the V-Net, against 3 labelled
//! cases, never to predict it: anterior Dice 0.0 on held-out cases (issue 10). A SAM that fails
//! on a class shows it in the class's share of the volume, and the labelled cases say what
//! share to expect — whatever SAM is used.
//!
//! The rule, per foreground class k: the labelled training cases give the range
//! [lo_k, hi_k] of k's voxel fraction (voxels of k / voxels of the volume). A pseudo-label whose
//! fraction q_k is below lo_k / F (the class missing or nearly so) or above F·hi_k (the class
//! swallowing its neighbours) for some k is dropped; F is `vnet.pseudo_label_guard` (4 in every
//! preset; 0 switches the guard off). A class that some labelled case lacks (lo_k = 0) may be
//! absent; a class that no labelled case has (hi_k = 0) may not appear. The factor is wide on
//! purpose: volumes differ in field of view and anatomy, and a pseudo-label need not be good
//! to pass, only not grossly wrong in one class.
//!
//! The whole case is dropped, not one class of it. A missing class's voxels are labelled as some
//! other class somewhere in the map and nothing tells where: ignoring only the voxels labelled k
//! would leave exactly the harmful ones (k's true voxels, labelled background) in the loss, and
//! the Dice term would still see k's empty target. A class that is too large has taken other
//! classes' voxels, again unknown which. A dropped case stays an unlabelled case: the SSL
//! method's own term (consistency, self-training) still learns from its image; only SAM's
//! pseudo-label is left out of the loss (`retrain`), and SFR+ does not absorb it.
use crate::error::Result;
use crate::job::Reporter;
use crate::limits::Classes;
use crate::pipeline::config::TrainConfig;
use crate::pipeline::data::Sample;
use crate::pipeline::retrain::UnlabeledCase;
use ndarray::{Array3, ArrayView3};
use serde::Serialize;

/// Fraction of the voxels of `label` in each class 0..num_classes (index = class).
pub fn class_fractions(label: &ArrayView3<u8>, num_classes: usize) -> Vec<f64> {
    let mut counts = vec![0u64; num_classes];
    for &v in label.iter() {
        // Values outside the classes cannot occur (labels are checked when loaded, SAM
        // predicts only its classes); they would count in no class.
        if let Some(c) = counts.get_mut(v as usize) {
            *c += 1;
        }
    }
    let n = label.len().max(1) as f64;
    counts.into_iter().map(|c| c as f64 / n).collect()
}

/// The range of one foreground class's voxel fraction over the labelled cases.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassRange {
    pub class: u8,
    pub min: f64,
    pub max: f64,
}

/// The check against the labelled cases' class ranges.
#[derive(Clone, Debug)]
pub struct Guard {
    pub factor: f64,
    pub ranges: Vec<ClassRange>,
    pub num_classes: usize,
}

impl Guard {
    /// The ranges of classes 1..num_classes over `labels` (the labelled training cases).
    pub fn new<'a>(factor: f64, labels: impl IntoIterator<Item = &'a Array3<u8>>, num_classes: usize) -> Guard {
        let mut ranges: Vec<ClassRange> = (1..num_classes).map(|k| ClassRange { class: k as u8, min: f64::INFINITY, max: 0.0 }).collect();
        let mut any = false;
        for l in labels {
            any = true;
            let f = class_fractions(&l.view(), num_classes);
            for r in &mut ranges {
                r.min = r.min.min(f[r.class as usize]);
                r.max = r.max.max(f[r.class as usize]);
            }
        }
        if !any {
            // No reference (cannot happen in `train`, which needs a labelled case): nothing passes.
            for r in &mut ranges {
                r.min = 0.0;
            }
        }
        Guard { factor, ranges, num_classes }
    }

    /// The guard of `cfg` over the labelled samples, or None when it is off.
    pub fn from_config(cfg: &TrainConfig, labeled: &[Sample], num_classes: usize) -> Option<Guard> {
        (cfg.vnet.pseudo_label_guard > 0.0).then(|| Guard::new(cfg.vnet.pseudo_label_guard, labeled.iter().filter_map(|s| s.label.as_ref()), num_classes))
    }

    /// Why a pseudo-label with these class fractions (from [`class_fractions`]) must not train;
    /// empty when it may.
    pub fn problems(&self, fractions: &[f64]) -> Vec<String> {
        let f = self.factor;
        let pct = |v: f64| format!("{:.3}%", 100.0 * v);
        let mut out = vec![];
        for r in &self.ranges {
            let q = fractions.get(r.class as usize).copied().unwrap_or(0.0);
            let range = format!("labelled cases {}–{}", pct(r.min), pct(r.max));
            if q < r.min / f {
                if q == 0.0 {
                    out.push(format!("class {} absent ({range})", r.class));
                } else {
                    out.push(format!("class {} at {}, below 1/{f} of the smallest labelled fraction ({range})", r.class, pct(q)));
                }
            } else if q > r.max * f {
                out.push(format!("class {} at {}, above {f}× the largest labelled fraction ({range})", r.class, pct(q)));
            }
        }
        out
    }

    /// [`Guard::problems`] of a label map.
    pub fn check(&self, label: &ArrayView3<u8>) -> Vec<String> {
        self.problems(&class_fractions(label, self.num_classes))
    }
}

/// One unlabelled case as the guard saw it (recorded in the model's `training.pseudo_label_guard`).
#[derive(Clone, Debug, Serialize)]
pub struct CaseVerdict {
    pub id: String,
    /// Whether its pseudo-label trains the V-Net (always true with the guard off).
    pub kept: bool,
    /// Voxel fraction of each foreground class 1..N in the pseudo-label.
    pub fractions: Vec<f64>,
    /// Why it was dropped (empty when kept).
    pub reasons: Vec<String>,
}

/// What re-training gets of the unlabelled cases after the SAM stage.
pub struct Guarded {
    /// SFR+'s confident samples whose pseudo-labels passed the guard: trained as labelled.
    pub absorbed: Vec<Sample>,
    /// The other unlabelled cases, with their pseudo-label, or without one when it was dropped.
    pub unlabeled: Vec<UnlabeledCase>,
    /// The guard's record for the model's metadata.
    pub record: serde_json::Value,
}

/// Checks every pseudo-label (index-aligned with `unlabeled` and `confident`) against the
/// labelled cases, reports what it keeps and drops and why, warns when it drops most of them,
/// and splits the cases for re-training: SFR+'s confident samples with a kept pseudo-label are
/// absorbed as labelled, the rest stay unlabelled (their pseudo-label only when kept).
#[allow(clippy::too_many_arguments)]
pub fn guard_pseudo_labels(
    cfg: &TrainConfig,
    classes: &Classes,
    labeled: &[Sample],
    unlabeled: Vec<Sample>,
    pseudo: Vec<Array3<u8>>,
    confident: Vec<bool>,
    reporter: &Reporter,
) -> Result<Guarded> {
    let num_classes = classes.len();
    let guard = Guard::from_config(cfg, labeled, num_classes);
    // The labelled ranges are recorded with the guard off too, so a run can be compared.
    let reference = guard.clone().unwrap_or_else(|| Guard::new(0.0, labeled.iter().filter_map(|s| s.label.as_ref()), num_classes));
    let name = |k: u8| classes.get(&(k as u16)).cloned().unwrap_or_default();
    let mut verdicts = Vec::with_capacity(unlabeled.len());
    let (mut absorbed, mut rest) = (vec![], vec![]);
    for ((s, p), conf) in unlabeled.into_iter().zip(pseudo).zip(confident) {
        let fractions = class_fractions(&p.view(), num_classes);
        let reasons = guard.as_ref().map(|g| g.problems(&fractions)).unwrap_or_default();
        let kept = reasons.is_empty();
        if !kept {
            reporter.message(&format!("pseudo-label guard: {} dropped: {}", s.id, reasons.join("; ")));
        }
        verdicts.push(CaseVerdict { id: s.id.clone(), kept, fractions: fractions[1..].to_vec(), reasons });
        if kept && conf && cfg.sfr_plus.enabled {
            // SFR+: confident samples were absorbed by the fine-tuning module; the V-Net
            // learns them with their pseudo-labels as labels.
            absorbed.push(Sample { label: Some(p), ..s });
        } else {
            rest.push(UnlabeledCase { sample: s, sam_pseudo: kept.then_some(p) });
        }
    }
    let (n, dropped) = (verdicts.len(), verdicts.iter().filter(|v| !v.kept).count());
    let ranges: Vec<serde_json::Value> =
        reference.ranges.iter().map(|r| serde_json::json!({"class": r.class, "name": name(r.class), "min": r.min, "max": r.max})).collect();
    let range_text: Vec<String> = reference.ranges.iter().map(|r| format!("class {} {:.3}–{:.3}%", r.class, 100.0 * r.min, 100.0 * r.max)).collect();
    match &guard {
        Some(g) => reporter.message(&format!(
            "pseudo-label guard (factor {}): {} of {n} pseudo-labels train the V-Net, {dropped} dropped (labelled class fractions: {})",
            g.factor,
            n - dropped,
            range_text.join(", ")
        )),
        None => reporter.message(&format!("pseudo-label guard off (vnet.pseudo_label_guard = 0): all {n} pseudo-labels train the V-Net")),
    }
    if n > 0 && 2 * dropped > n {
        let (what, effect) = if dropped == n {
            ("every pseudo-label".to_string(), format!("re-training is {} alone, without SAM", cfg.method.name()))
        } else {
            (format!("{dropped} of {n} pseudo-labels"), format!("SFR adds little to {} alone", cfg.method.name()))
        };
        let msg = format!(
            "WARNING: the pseudo-label guard dropped {what}: SAM's pseudo-labels disagree grossly with the labelled cases' class fractions, so {effect}. Check the SAM stage (checkpoint, sam.iterations) or look at them with --write-pseudo-labels; {{\"vnet\": {{\"pseudo_label_guard\": 0}}}} trains on them anyway."
        );
        log::warn!("{msg}");
        reporter.message(&msg);
    }
    let record = serde_json::json!({
        "factor": guard.as_ref().map_or(0.0, |g| g.factor),
        "enabled": guard.is_some(),
        "labeled_fractions": ranges,
        "kept": n - dropped,
        "dropped": dropped,
        "cases": verdicts,
    });
    Ok(Guarded { absorbed, unlabeled: rest, record })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    /// A 10×10×10 label map with `n1` voxels of class 1 and `n2` of class 2.
    fn label(n1: usize, n2: usize) -> Array3<u8> {
        let mut a = Array3::<u8>::zeros((10, 10, 10));
        for (i, v) in a.iter_mut().enumerate() {
            if i < n1 {
                *v = 1;
            } else if i < n1 + n2 {
                *v = 2;
            }
        }
        a
    }

    #[test]
    fn fractions_count_every_class() {
        let f = class_fractions(&label(100, 50).view(), 3);
        assert_eq!(f, vec![0.85, 0.1, 0.05]);
        let mut l = label(0, 0);
        l.slice_mut(s![0, .., ..]).fill(2);
        assert_eq!(class_fractions(&l.view(), 3), vec![0.9, 0.0, 0.1]);
    }

    #[test]
    fn a_missing_class_is_dropped_in_range_kept_too_large_dropped() {
        // labelled: class 1 at 10%–20%, class 2 at 5%–8%
        let labelled = [label(100, 50), label(200, 80)];
        let g = Guard::new(4.0, &labelled, 3);
        assert_eq!(g.ranges, vec![ClassRange { class: 1, min: 0.1, max: 0.2 }, ClassRange { class: 2, min: 0.05, max: 0.08 }]);
        // in range, and inside the factor's margin on both sides
        assert!(g.check(&label(150, 60).view()).is_empty());
        assert!(g.check(&label(30, 300).view()).is_empty(), "3% ≥ 10%/4 and 30% ≤ 8%·4");
        // class 2 missing: the hippocampus failure
        let p = g.check(&label(200, 0).view());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("class 2 absent"), "{p:?}");
        // a class too small, but present
        let p = g.check(&label(20, 60).view());
        assert!(p.len() == 1 && p[0].contains("class 1") && p[0].contains("below 1/4"), "{p:?}");
        // a class too large
        let p = g.check(&label(150, 330).view());
        assert!(p.len() == 1 && p[0].contains("class 2") && p[0].contains("above 4×"), "{p:?}");
        // both wrong: both said
        assert_eq!(g.check(&label(0, 400).view()).len(), 2);
        // a wider factor lets the too-small class through
        assert!(Guard::new(8.0, &labelled, 3).check(&label(20, 60).view()).is_empty());
    }

    #[test]
    fn classes_some_or_no_labelled_case_lacks() {
        // class 2 absent from one labelled case: its absence is no evidence of failure
        let g = Guard::new(4.0, &[label(100, 0), label(120, 40)], 3);
        assert!(g.check(&label(110, 0).view()).is_empty());
        // class 2 in no labelled case: a pseudo-label with it is dropped, one without kept
        let g = Guard::new(4.0, &[label(100, 0), label(120, 0)], 3);
        assert!(g.check(&label(110, 0).view()).is_empty());
        let p = g.check(&label(110, 5).view());
        assert!(p.len() == 1 && p[0].contains("class 2") && p[0].contains("above"), "{p:?}");
    }

    #[test]
    fn split_drops_keeps_absorbs_and_records() {
        let classes = Classes::new("t", [(0, "background".into()), (1, "a".into()), (2, "b".into())].into()).unwrap();
        let sample = |id: &str, l: Option<Array3<u8>>| Sample { id: id.into(), image: Array3::zeros((10, 10, 10)), label: l, geometry: Default::default() };
        let labelled = vec![sample("l0", Some(label(100, 50))), sample("l1", Some(label(200, 80)))];
        let unl = vec![sample("u0", None), sample("u1", None), sample("u2", None)];
        let pseudo = vec![label(150, 60), label(200, 0), label(120, 70)];
        let mut cfg = TrainConfig::test_tiny();
        cfg.sfr_plus.enabled = true;
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let m2 = messages.clone();
        let r = Reporter::detached(Some(Box::new(move |p| m2.lock().unwrap().push(p.message.clone()))));
        let g = guard_pseudo_labels(&cfg, &classes, &labelled, unl.clone(), pseudo.clone(), vec![false, true, true], &r).unwrap();
        // u0 kept (not confident: stays unlabelled with its pseudo-label), u1 dropped (class 2
        // absent: stays unlabelled without one, although confident), u2 kept and absorbed
        assert_eq!(g.absorbed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["u2"]);
        assert_eq!(g.unlabeled.iter().map(|u| (u.sample.id.as_str(), u.sam_pseudo.is_some())).collect::<Vec<_>>(), [("u0", true), ("u1", false)]);
        assert_eq!((g.record["kept"].as_u64(), g.record["dropped"].as_u64()), (Some(2), Some(1)));
        assert_eq!(g.record["cases"][1]["id"], "u1");
        assert_eq!(g.record["cases"][1]["kept"], false);
        assert!(g.record["cases"][1]["reasons"][0].as_str().unwrap().contains("class 2 absent"));
        assert_eq!(g.record["labeled_fractions"][1]["name"], "b");
        let msgs = messages.lock().unwrap().clone();
        assert!(msgs.iter().any(|m| m.contains("u1 dropped: class 2 absent")), "{msgs:?}");
        assert!(!msgs.iter().any(|m| m.contains("WARNING")), "one of three dropped is no alarm: {msgs:?}");
        // most dropped: a loud warning
        let bad = vec![label(200, 0), label(0, 50), label(120, 70)];
        let m3 = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let m4 = m3.clone();
        let r = Reporter::detached(Some(Box::new(move |p| m4.lock().unwrap().push(p.message.clone()))));
        let g = guard_pseudo_labels(&cfg, &classes, &labelled, unl.clone(), bad.clone(), vec![false; 3], &r).unwrap();
        assert_eq!(g.record["dropped"].as_u64(), Some(2));
        assert!(m3.lock().unwrap().iter().any(|m| m.starts_with("WARNING: the pseudo-label guard dropped 2 of 3")));
        // off: everything trains, the fractions are still recorded
        cfg.vnet.pseudo_label_guard = 0.0;
        let g = guard_pseudo_labels(&cfg, &classes, &labelled, unl, bad, vec![false; 3], &quiet()).unwrap();
        assert!(g.unlabeled.iter().all(|u| u.sam_pseudo.is_some()));
        assert_eq!((g.record["enabled"].as_bool(), g.record["dropped"].as_u64()), (Some(false), Some(0)));
        assert_eq!(g.record["cases"][0]["fractions"][1], 0.0);
    }

    fn quiet() -> Reporter {
        Reporter::detached(None)
    }
}
