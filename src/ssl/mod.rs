//! Re-training methods (the paper's SSL module) behind one trait. The training loop
//! (`pipeline::retrain`) owns the student, the data and the supervised and SAM pseudo-label
//! terms; a method adds its own unsupervised term on the unlabelled part of each batch and may
//! update state after each optimiser step.
//!
//! - `supervised`: no term (the lower bound; with SFR it still learns from SAM pseudo-labels).
//! - `self-training`: the loop trains a teacher on the first half of the iterations, predicts
//!   pseudo-labels for the unlabelled volumes with it, and this term is CE+Dice against them.
//! - `mean-teacher` (Tarvainen & Valpola; UA-MT's recipe): EMA teacher, softmax-MSE to the
//!   teacher's prediction of the input plus clamp(N(0, σ²), ±c) noise, weight
//!   `consistency · exp(-5(1-t)²)` ramped over `rampup_epochs`.
//! - `acmt`: the mean-teacher consistency restricted to the most ambiguous voxels — those
//!   whose teacher prediction has the highest entropy (the top `acmt_ratio` fraction of the
//!   batch), the entropy-based selection of ACMT (Xu et al., MedIA 2023).
use crate::error::Result;
use crate::nn::loss::ce_dice;
use crate::nn::vnet::VNet;
use tch::{nn, Device, Kind, Tensor};

pub mod config;
pub use config::{BnBatches, LrSchedule, Method, VNetStage};

/// What a method sees of the unlabelled half of a batch.
pub struct Unlabeled<'a> {
    pub input: &'a Tensor,
    /// Student logits on `input` (with grad).
    pub student_logits: &'a Tensor,
    /// The loop's own pseudo-labels for these crops (self-training's second phase).
    pub own_pseudo: Option<&'a Tensor>,
    pub iteration: usize,
}

pub trait SslMethod: Send {
    fn method(&self) -> Method;
    /// The method's unsupervised loss, already weighted; `None` when it adds nothing now.
    fn unsupervised(&mut self, u: &Unlabeled) -> Result<Option<Tensor>>;
    /// Called after each optimiser step.
    fn after_step(&mut self, _student: &VNet, _iteration: usize) -> Result<()> {
        Ok(())
    }
    /// The network to keep for inference at the end (the student unless overridden).
    fn teacher(&self) -> Option<&VNet> {
        None
    }
    /// State to checkpoint (the EMA teacher's weights), for an exact resume.
    fn state(&self) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// Restores [`SslMethod::state`] of a run stopped after `steps` optimiser steps.
    fn restore(&mut self, _state: Vec<(String, Tensor)>, _steps: usize) -> Result<()> {
        Ok(())
    }
}

/// `exp(-5 (1 - t)²)` with t = current/length clipped to [0, 1] (Laine & Aila's ramp-up).
pub fn sigmoid_rampup(current: f64, length: f64) -> f64 {
    if length <= 0.0 {
        return 1.0;
    }
    let t = (current / length).clamp(0.0, 1.0);
    (-5.0 * (1.0 - t) * (1.0 - t)).exp()
}

pub fn consistency_weight(cfg: &VNetStage, iteration: usize) -> f64 {
    let epoch = iteration as f64 / cfg.iterations_per_epoch.max(1) as f64;
    cfg.consistency * sigmoid_rampup(epoch, cfg.rampup_epochs)
}

pub struct Supervised;

impl SslMethod for Supervised {
    fn method(&self) -> Method {
        Method::Supervised
    }
    fn unsupervised(&mut self, _u: &Unlabeled) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub struct SelfTraining;

impl SslMethod for SelfTraining {
    fn method(&self) -> Method {
        Method::SelfTraining
    }
    fn unsupervised(&mut self, u: &Unlabeled) -> Result<Option<Tensor>> {
        Ok(u.own_pseudo.map(|pl| ce_dice(u.student_logits, pl)))
    }
}

/// Mean teacher, and ACMT when `ambiguous_ratio` is set.
pub struct MeanTeacher {
    teacher: VNet,
    _vs: nn::VarStore,
    cfg: VNetStage,
    ambiguous_ratio: Option<f64>,
    steps: usize,
}

impl MeanTeacher {
    pub fn new(student: &VNet, cfg: &VNetStage, device: Device, acmt: bool) -> Result<MeanTeacher> {
        let vs = nn::VarStore::new(device);
        let mut teacher = VNet::new(&vs.root(), student.config())?;
        teacher.load_state_dict(student.state_dict(), "student")?;
        // the teacher is never trained by gradient
        for (_, t) in teacher.state_dict() {
            let _ = t.set_requires_grad(false);
        }
        Ok(MeanTeacher { teacher, _vs: vs, cfg: cfg.clone(), ambiguous_ratio: acmt.then_some(cfg.acmt_ratio), steps: 0 })
    }
}

impl SslMethod for MeanTeacher {
    fn method(&self) -> Method {
        if self.ambiguous_ratio.is_some() {
            Method::Acmt
        } else {
            Method::MeanTeacher
        }
    }

    fn unsupervised(&mut self, u: &Unlabeled) -> Result<Option<Tensor>> {
        let w = consistency_weight(&self.cfg, u.iteration);
        let noise = (u.input.randn_like() * self.cfg.noise_std).clamp(-self.cfg.noise_clamp, self.cfg.noise_clamp);
        // UA-MT runs the EMA model in training mode (batch statistics, dropout on).
        let teacher_probs = tch::no_grad(|| self.teacher.f_forward_t(&(u.input + noise), true))?.softmax(1, Kind::Float);
        let student_probs = u.student_logits.softmax(1, Kind::Float);
        let sq = (&student_probs - &teacher_probs).square();
        let loss = match self.ambiguous_ratio {
            None => sq.mean(Kind::Float),
            Some(ratio) => {
                let entropy = -(&teacher_probs * (&teacher_probs + 1e-6).log()).sum_dim_intlist(1, false, Kind::Float);
                let flat = entropy.view(-1);
                let k = ((flat.size()[0] as f64 * ratio).ceil() as i64).clamp(1, flat.size()[0]);
                let (top, _) = flat.topk(k, 0, true, false);
                let threshold = top.min();
                let mask = entropy.ge_tensor(&threshold).to_kind(Kind::Float).unsqueeze(1);
                let c = teacher_probs.size()[1] as f64;
                (sq * &mask).sum(Kind::Float) / (mask.sum(Kind::Float) * c + 1e-8)
            }
        };
        Ok(Some(loss * w))
    }

    /// EMA of the trainable weights, decay min(1 - 1/(step + 1), ema_decay) (UA-MT).
    fn after_step(&mut self, student: &VNet, _iteration: usize) -> Result<()> {
        let alpha = (1.0 - 1.0 / (self.steps as f64 + 1.0)).min(self.cfg.ema_decay);
        self.steps += 1;
        // In place, one kernel per tensor and no temporaries: t += (1 - α)(s - t).
        tch::no_grad(|| {
            for ((_, mut t), (_, s)) in self.teacher.state_dict().into_iter().zip(student.state_dict()) {
                if s.requires_grad() {
                    let _ = t.lerp_(&s, 1.0 - alpha);
                }
            }
        });
        Ok(())
    }

    fn teacher(&self) -> Option<&VNet> {
        Some(&self.teacher)
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.teacher.state_dict().into_iter().map(|(k, t)| (format!("teacher.{k}"), t)).collect()
    }

    fn restore(&mut self, state: Vec<(String, Tensor)>, steps: usize) -> Result<()> {
        let teacher: Vec<(String, Tensor)> = state.into_iter().filter_map(|(k, t)| k.strip_prefix("teacher.").map(|k| (k.to_string(), t))).collect();
        if teacher.is_empty() {
            return Err(crate::Error::invalid("the checkpoint holds no mean-teacher weights"));
        }
        self.teacher.load_state_dict(teacher, "checkpoint (teacher)")?;
        for (_, t) in self.teacher.state_dict() {
            let _ = t.set_requires_grad(false);
        }
        self.steps = steps;
        Ok(())
    }
}

/// The method object for `method`.
pub fn build(method: Method, student: &VNet, cfg: &VNetStage, device: Device) -> Result<Box<dyn SslMethod>> {
    Ok(match method {
        Method::Supervised => Box::new(Supervised),
        Method::SelfTraining => Box::new(SelfTraining),
        Method::MeanTeacher => Box::new(MeanTeacher::new(student, cfg, device, false)?),
        Method::Acmt => Box::new(MeanTeacher::new(student, cfg, device, true)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::vnet::VNetConfig;
    use crate::pipeline::config::TrainConfig;

    #[test]
    fn rampup_shape() {
        assert!((sigmoid_rampup(0.0, 40.0) - (-5f64).exp()).abs() < 1e-12);
        assert_eq!(sigmoid_rampup(40.0, 40.0), 1.0);
        assert_eq!(sigmoid_rampup(80.0, 40.0), 1.0);
        let cfg = TrainConfig::paper_la().vnet;
        assert!((consistency_weight(&cfg, 6000) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn ema_moves_teacher_towards_student_and_acmt_masks() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg_net = VNetConfig { n_filters: 2, ..VNetConfig::default() };
        let student = VNet::new(&vs.root(), &cfg_net).unwrap();
        let cfg = TrainConfig::test_tiny().vnet;
        let mut mt = MeanTeacher::new(&student, &cfg, Device::Cpu, true).unwrap();
        // perturb the student, then one EMA step at step 0 copies it exactly (alpha = 0)
        tch::no_grad(|| {
            for (_, mut s) in student.state_dict() {
                if s.requires_grad() {
                    let _ = s.g_add_scalar_(0.5);
                }
            }
        });
        mt.after_step(&student, 0).unwrap();
        for ((_, t), (_, s)) in mt.teacher.state_dict().into_iter().zip(student.state_dict()) {
            if s.requires_grad() {
                assert!(f64::try_from((&t - &s).abs().max()).unwrap() < 1e-6);
            }
        }
        let x = Tensor::randn([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu));
        let logits = student.f_forward_t(&x, true).unwrap();
        let u = Unlabeled { input: &x, student_logits: &logits, own_pseudo: None, iteration: 10_000 };
        let l = mt.unsupervised(&u).unwrap().unwrap();
        let v = f64::try_from(&l).unwrap();
        assert!(v.is_finite() && v >= 0.0);
        l.backward(); // differentiable w.r.t. the student
    }
}
