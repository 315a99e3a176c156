//! Segmentation losses shared by SAM fine-tuning and V-Net re-training.
//!
//! `ce_dice` is the method's loss 0.5·(CE + Dice): cross-entropy with pixels labelled
//! `IGNORE` (255, the stitching padding) left out, plus the soft Dice of UA-MT/ACMT
//! (`1 - (2·Σ p·t + ε) / (Σ p² + Σ t² + ε)`) averaged over the foreground classes, on the same
//! pixels.
use tch::{Kind, Reduction, Tensor};

/// Label value that no loss looks at (padding of stitched canvases).
pub const IGNORE: i64 = 255;
const SMOOTH: f64 = 1e-5;

/// Soft Dice loss over classes 1..C of `probs` [B, C, ...] against integer `target` [B, ...];
/// `valid` [B, ...] (bool) masks the pixels that count.
pub fn dice_loss(probs: &Tensor, target: &Tensor, valid: Option<&Tensor>) -> Tensor {
    let c = probs.size()[1];
    assert!(c >= 2, "segmentation needs background and at least one class");
    let mut total = Tensor::zeros([], (Kind::Float, probs.device()));
    for k in 1..c {
        let p = probs.select(1, k);
        let t = target.eq(k).to_kind(Kind::Float);
        let (p, t) = match valid {
            Some(v) => {
                let v = v.to_kind(Kind::Float);
                (p * &v, t * v)
            }
            None => (p, t),
        };
        let inter = (&p * &t).sum(Kind::Float);
        let z = (&p * &p).sum(Kind::Float);
        let y = (&t * &t).sum(Kind::Float);
        total = total + (1.0 - (inter * 2.0 + SMOOTH) / (z + y + SMOOTH));
    }
    total / (c - 1) as f64
}

/// 0.5·(CE + Dice) of `logits` [B, C, ...] against `target` [B, ...] (Int64; `IGNORE` skipped).
pub fn ce_dice(logits: &Tensor, target: &Tensor) -> Tensor {
    let target = target.to_kind(Kind::Int64);
    let ce = logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, IGNORE, 0.0);
    let valid = target.ne(IGNORE);
    let probs = logits.softmax(1, Kind::Float);
    let dice = dice_loss(&probs, &target, Some(&valid));
    (ce + dice) * 0.5
}

/// The value of a training loss, or an error naming the stage when it is NaN or infinite
/// (training has diverged: continuing would only write a broken model).
pub fn finite_loss(loss: &Tensor, stage: &str, iteration: usize) -> crate::error::Result<f64> {
    let v = f64::try_from(loss).unwrap_or(f64::NAN);
    if v.is_finite() {
        Ok(v)
    } else {
        Err(crate::error::Error::invalid(format!("{stage} diverged at iteration {iteration} (loss {v})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_prediction_has_low_loss_and_ignore_is_ignored() {
        let target = Tensor::from_slice(&[0i64, 1, 1, 0, 255, 255]).view([1, 6]);
        // logits strongly favour the right class; the ignored pixels are wrong on purpose
        let right = Tensor::from_slice(&[10f32, -10., -10., 10., -10., -10.]);
        let logits = Tensor::stack(&[right.shallow_clone(), -right], 0).view([1, 2, 6]);
        let l = f64::try_from(ce_dice(&logits, &target)).unwrap();
        assert!(l < 1e-3, "loss {l}");
        let wrong = -logits;
        let l2 = f64::try_from(ce_dice(&wrong, &target)).unwrap();
        assert!(l2 > 5.0, "loss {l2}");
    }

    #[test]
    fn dice_matches_hand_computation() {
        // p = [0.2, 0.8, 0.6] for class 1, t = [0, 1, 1]
        let p1 = Tensor::from_slice(&[0.2f32, 0.8, 0.6]);
        let probs = Tensor::stack(&[1.0 - &p1, p1], 0).view([1, 2, 3]);
        let t = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
        let got = f64::try_from(dice_loss(&probs, &t, None)).unwrap();
        let inter = 0.8 + 0.6;
        let z = 0.04 + 0.64 + 0.36;
        let want = 1.0 - (2.0 * inter + SMOOTH) / (z + 2.0 + SMOOTH);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
