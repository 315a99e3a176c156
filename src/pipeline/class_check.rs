//! The check every trained model passes before it is handed over: is every class predicted?
//!
//! A V-Net can finish training without ever predicting one of its classes (a minority class
//! whose voxels' last-layer features all fall below ReLU's threshold early in training gets no
//! gradient from then on). Its loss still falls, the other classes look fine, and a radiologist
//! would get a model that cannot find half the structure. So after training the model segments
//! the cases it can be judged on (the validation cases, else its own labelled cases: a fit, not
//! a test) and each class is judged:
//! - **never predicted**: not one voxel of the class in any case, although the references have
//!   it;
//! - **far below the others**: mean Dice under [`FAR_BELOW_FRACTION`] of the best class's, or
//!   under [`MIN_DICE`].
//!
//! On its own labelled cases a working model scores 0.8–0.95 for every class (hippocampus, 4
//! labels); a failed one scores 0.0 for the lost class. The thresholds sit far from both.
//! The verdict goes into the model's metadata (`training.class_check`); the CLI, the C ABI and
//! the Slicer module read it from there.
use crate::metrics::ClassMetrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A class whose mean Dice is below this fraction of the best class's is "far below the others".
pub const FAR_BELOW_FRACTION: f64 = 0.5;
/// A class whose mean Dice is below this is "far below", whatever the others do.
pub const MIN_DICE: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    NeverPredicted,
    FarBelow,
    /// No reference voxel of the class in the judged cases: nothing to judge it by.
    NotInReferences,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassVerdict {
    pub class: u16,
    pub name: String,
    pub dice_mean: f64,
    pub pred_voxels: u64,
    pub ref_voxels: u64,
    pub verdict: Verdict,
}

/// The check of one model, as stored in its metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassCheck {
    /// `validation` (held-out labelled cases) or `fit` (the labelled training cases).
    pub judged_on: String,
    pub cases: usize,
    pub classes: Vec<ClassVerdict>,
}

impl ClassCheck {
    /// Judges every foreground class of `classes` on per-case metrics.
    pub fn new(per_case: &[Vec<ClassMetrics>], classes: &BTreeMap<u16, String>, judged_on: &str) -> ClassCheck {
        let mut out = vec![];
        for (&c, name) in classes.iter().filter(|(&c, _)| c != 0) {
            let rows: Vec<&ClassMetrics> = per_case.iter().flat_map(|v| v.iter().filter(move |m| m.class == c)).collect();
            let dice_mean = if rows.is_empty() { 0.0 } else { rows.iter().map(|m| m.dice).sum::<f64>() / rows.len() as f64 };
            out.push(ClassVerdict {
                class: c,
                name: name.clone(),
                dice_mean,
                pred_voxels: rows.iter().map(|m| m.pred_voxels).sum(),
                ref_voxels: rows.iter().map(|m| m.ref_voxels).sum(),
                verdict: Verdict::Ok,
            });
        }
        let best = out.iter().filter(|v| v.ref_voxels > 0).map(|v| v.dice_mean).fold(0.0, f64::max);
        for v in &mut out {
            v.verdict = if v.ref_voxels == 0 {
                Verdict::NotInReferences
            } else if v.pred_voxels == 0 {
                Verdict::NeverPredicted
            } else if v.dice_mean < MIN_DICE || v.dice_mean < FAR_BELOW_FRACTION * best {
                Verdict::FarBelow
            } else {
                Verdict::Ok
            };
        }
        ClassCheck { judged_on: judged_on.into(), cases: per_case.len(), classes: out }
    }

    /// The classes that failed.
    pub fn failed(&self) -> Vec<&ClassVerdict> {
        self.classes.iter().filter(|v| matches!(v.verdict, Verdict::NeverPredicted | Verdict::FarBelow)).collect()
    }

    /// The check as stored under `training.class_check` of a model's metadata, if it is there.
    pub fn from_training(training: &serde_json::Value) -> Option<ClassCheck> {
        serde_json::from_value(training.get("class_check")?.clone()).ok()
    }

    /// One warning for people: which classes failed, on what, and what to try. `None` when
    /// every class passed.
    pub fn warning(&self) -> Option<String> {
        let failed = self.failed();
        if failed.is_empty() {
            return None;
        }
        let best = self.classes.iter().filter(|v| v.verdict == Verdict::Ok).map(|v| v.dice_mean).fold(f64::NAN, f64::max);
        let on = if self.judged_on == "validation" {
            format!("the {} validation cases", self.cases)
        } else {
            format!("its own {} labelled training cases", self.cases)
        };
        let what: Vec<String> = failed
            .iter()
            .map(|v| match v.verdict {
                Verdict::NeverPredicted => format!("class {} '{}' is never predicted (Dice 0 on {on})", v.class, v.name),
                _ => format!("class {} '{}' is far below the others (mean Dice {:.2} on {on})", v.class, v.name, v.dice_mean),
            })
            .collect();
        let others = if best.is_finite() { format!("; the other classes reach Dice {best:.2}") } else { String::new() };
        Some(format!(
            "training failed: {}{others}. Do not use this model. Try another seed (--seed), more \
             iterations, or more labelled cases that show the class",
            what.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(class: u16, dice: f64, pred: u64, reference: u64) -> ClassMetrics {
        ClassMetrics { class, dice, jaccard: 0.0, asd: None, assd: None, hd: None, hd95: None, pred_voxels: pred, ref_voxels: reference }
    }

    fn classes() -> BTreeMap<u16, String> {
        [(0, "background"), (1, "Anterior"), (2, "Posterior")].into_iter().map(|(c, n)| (c, n.to_string())).collect()
    }

    #[test]
    fn a_class_never_predicted_fails_and_is_named() {
        // The failure seen on hippocampus: anterior never predicted, posterior fine.
        let rows = vec![vec![m(1, 0.0, 0, 1500), m(2, 0.93, 1300, 1250)], vec![m(1, 0.0, 0, 1400), m(2, 0.95, 1200, 1210)]];
        let c = ClassCheck::new(&rows, &classes(), "fit");
        assert_eq!(c.classes[0].verdict, Verdict::NeverPredicted);
        assert_eq!(c.classes[1].verdict, Verdict::Ok);
        let w = c.warning().expect("a failed class warns");
        assert!(w.contains("class 1 'Anterior' is never predicted (Dice 0 on its own 2 labelled training cases)"), "{w}");
        assert!(w.contains("the other classes reach Dice 0.94"), "{w}");
        assert!(w.contains("Try another seed"), "{w}");
    }

    #[test]
    fn far_below_and_ok() {
        let rows = vec![vec![m(1, 0.30, 800, 1500), m(2, 0.90, 1300, 1250)]];
        let c = ClassCheck::new(&rows, &classes(), "validation");
        assert_eq!(c.classes[0].verdict, Verdict::FarBelow);
        assert!(c.warning().unwrap().contains("far below the others (mean Dice 0.30 on the 1 validation cases)"));
        let good = vec![vec![m(1, 0.82, 1400, 1500), m(2, 0.90, 1300, 1250)]];
        let c = ClassCheck::new(&good, &classes(), "fit");
        assert!(c.failed().is_empty() && c.warning().is_none());
        // A class absent from every reference cannot be judged, and does not fail.
        let absent = vec![vec![m(1, 1.0, 0, 0), m(2, 0.90, 1300, 1250)]];
        let c = ClassCheck::new(&absent, &classes(), "fit");
        assert_eq!(c.classes[0].verdict, Verdict::NotInReferences);
        assert!(c.warning().is_none());
    }

    #[test]
    fn round_trips_through_metadata() {
        let rows = vec![vec![m(1, 0.0, 0, 1500), m(2, 0.93, 1300, 1250)]];
        let c = ClassCheck::new(&rows, &classes(), "fit");
        let training = serde_json::json!({ "class_check": c });
        assert_eq!(ClassCheck::from_training(&training), Some(c));
        assert_eq!(ClassCheck::from_training(&serde_json::json!({})), None);
    }
}
