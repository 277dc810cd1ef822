//! Reward-model and SFT losses, per example so callers can average over a global batch split
//! into micro-batches.
//!
//! - SteerLM regression (Dong et al. 2023, <https://arxiv.org/abs/2310.05344>; HelpSteer2, Wang
//!   et al. 2024, <https://arxiv.org/abs/2406.08673>): mean squared error between the head's
//!   attribute outputs and the human ratings.
//! - Bradley-Terry: `-log σ(r_chosen - r_rejected - m)` with an optional margin `m` (Llama 2
//!   uses the rating gap as margin).
//! - Scaled Bradley-Terry (HelpSteer2-Preference, Wang et al. 2024,
//!   <https://arxiv.org/abs/2410.01257>): the same term weighted by the annotated preference
//!   strength `|s|` (1..3).
//!
//! `scripts/golden/rm_losses.py` holds these to PyTorch (values and gradients), see
//! `tests/parity.rs`.

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

fn check_same(a: &Tensor, an: &str, b: &Tensor, bn: &str) -> Result<()> {
    if a.size() != b.size() {
        return Err(TrainError::config(
            "loss inputs",
            format!(
                "`{an}` has shape {:?} but `{bn}` has {:?}",
                a.size(),
                b.size()
            ),
        ));
    }
    Ok(())
}

/// Losses run in f64 for f64 inputs and in f32 otherwise (reduced-precision scores are promoted).
fn promote(t: &Tensor) -> Result<Tensor> {
    let k = if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    Ok(t.f_to_kind(k)?)
}

/// Per-example MSE over attributes: `mean_a (pred - target)^2`, (b,). `pred`, `target`:
/// (b, a).
pub fn regression_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    check_same(pred, "pred", target, "target")?;
    let p = promote(pred)?;
    let d = &p - target.f_to_kind(p.kind())?;
    Ok(d.f_square()?.f_mean_dim([-1].as_slice(), false, p.kind())?)
}

/// Per-pair Bradley-Terry loss `w * -log σ(r_c - r_r - m)`, (b,). `chosen`, `rejected`,
/// and when given `margin` and `weight`: (b,).
pub fn bradley_terry_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    check_same(chosen, "chosen", rejected, "rejected")?;
    let c = promote(chosen)?;
    let k = c.kind();
    let mut diff = &c - rejected.f_to_kind(k)?;
    if let Some(m) = margin {
        check_same(chosen, "chosen", m, "margin")?;
        diff = diff - m.f_to_kind(k)?;
    }
    // -log σ(x) = softplus(-x), computed stably by log_sigmoid.
    let mut loss = diff.f_log_sigmoid()?.f_neg()?;
    if let Some(w) = weight {
        check_same(chosen, "chosen", w, "weight")?;
        loss = loss * w.f_to_kind(k)?;
    }
    Ok(loss)
}

/// Summed negative log-likelihood of the marked target tokens: `-sum(logprobs * mask)`, a
/// scalar. `logprobs`, `mask`: (b, t-1), targets shifted by one as `token_logprobs` returns them.
pub fn sft_loss_sum(logprobs: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_same(logprobs, "logprobs", mask, "mask")?;
    Ok((logprobs * mask.f_to_kind(Kind::Float)?)
        .f_sum(Kind::Float)?
        .f_neg()?)
}

/// Pearson correlation of two equally long samples; `None` when either is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some(sxy / (sxx.sqrt() * syy.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bt_matches_closed_form() {
        let c = Tensor::from_slice(&[2.0f32, 0.0]);
        let r = Tensor::from_slice(&[1.0f32, 0.0]);
        let l = bradley_terry_loss(&c, &r, None, None).unwrap();
        let v = Vec::<f32>::try_from(l).unwrap();
        assert!((v[0] - (1.0 + (-1.0f32).exp()).ln()).abs() < 1e-6);
        assert!((v[1] - 2f32.ln()).abs() < 1e-6);
        let m = Tensor::from_slice(&[1.0f32, 0.0]);
        let w = Tensor::from_slice(&[3.0f32, 2.0]);
        let v =
            Vec::<f32>::try_from(bradley_terry_loss(&c, &r, Some(&m), Some(&w)).unwrap()).unwrap();
        assert!((v[0] - 3.0 * 2f32.ln()).abs() < 1e-6 && (v[1] - 2.0 * 2f32.ln()).abs() < 1e-6);
        let bad = Tensor::from_slice(&[1.0f32]);
        assert!(bradley_terry_loss(&c, &bad, None, None)
            .unwrap_err()
            .to_string()
            .contains("rejected"));
    }

    #[test]
    fn mse_and_pearson() {
        let p = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 5.0]).view([2, 2]);
        let t = Tensor::from_slice(&[1.0f32, 4.0, 3.0, 3.0]).view([2, 2]);
        let v = Vec::<f32>::try_from(regression_loss(&p, &t).unwrap()).unwrap();
        assert_eq!(v, vec![2.0, 2.0]);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]).unwrap() - 0.9986).abs() < 1e-3);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
