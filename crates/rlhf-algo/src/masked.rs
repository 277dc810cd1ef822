//! Masked reductions (sum, mean, variance, whitening) over `(batch, seq)` tensors, and the input
//! checks that every public entry point of this crate runs before it computes anything.
//!
//! Masks may be `bool` or any numeric dtype (non-zero means "this token counts"). Masked-out
//! positions are replaced by zero with `where`, never multiplied by zero: padding may hold NaN or
//! infinity (a logprob of a pad token, say), and `NaN * 0` is still NaN.

use tch::{Kind, Tensor};

use crate::error::{AlgoError, Location, Result};

/// A mask resolved once per call: `on` selects tokens (bool), `weight` is the same mask as 0/1 in
/// the dtype of the values it is applied to.
pub(crate) struct Mask {
    pub(crate) on: Tensor,
    pub(crate) weight: Tensor,
}

impl Mask {
    /// Resolves `mask` for values of dtype `kind`.
    pub(crate) fn new(name: &'static str, mask: &Tensor, kind: Kind) -> Result<Self> {
        let on = match mask.f_kind()? {
            Kind::Bool => mask.f_detach()?,
            Kind::Uint8
            | Kind::Int8
            | Kind::Int16
            | Kind::Int
            | Kind::Int64
            | Kind::Half
            | Kind::BFloat16
            | Kind::Float
            | Kind::Double => mask.f_detach()?.f_ne(0)?,
            actual => {
                return Err(AlgoError::Kind {
                    tensor: name,
                    actual,
                    expected: "bool or a numeric 0/1 mask",
                })
            }
        };
        let weight = on.f_to_kind(kind)?;
        Ok(Mask { on, weight })
    }

    /// `x` with masked-out positions set to exactly zero (and a zero gradient there).
    pub(crate) fn zero_out(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_where_scalarother(&self.on, 0.0)?)
    }
}

/// The dtype of `x`, which must be floating point.
pub(crate) fn float_kind(name: &'static str, x: &Tensor) -> Result<Kind> {
    match x.f_kind()? {
        k @ (Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) => Ok(k),
        actual => Err(AlgoError::Kind {
            tensor: name,
            actual,
            expected: "a floating-point dtype",
        }),
    }
}

/// `(batch, seq)` of a 2-D tensor.
pub(crate) fn dims2(name: &'static str, x: &Tensor) -> Result<(i64, i64)> {
    match x.size().as_slice() {
        &[b, t] => Ok((b, t)),
        actual => Err(AlgoError::Shape {
            tensor: name,
            actual: actual.to_vec(),
            expected: "(batch, seq)".into(),
        }),
    }
}

/// Fails unless `x` has exactly `shape`; `like` names what the shape comes from.
pub(crate) fn expect_shape(
    name: &'static str,
    x: &Tensor,
    shape: &[i64],
    like: &str,
) -> Result<()> {
    let actual = x.size();
    if actual == shape {
        Ok(())
    } else {
        Err(AlgoError::Shape {
            tensor: name,
            actual,
            expected: format!("{shape:?} like `{like}`"),
        })
    }
}

/// Sum of `x` over unmasked positions: over everything when `dim` is `None`, else along `dim`.
pub fn masked_sum(x: &Tensor, mask: &Tensor, dim: Option<i64>) -> Result<Tensor> {
    expect_shape("x", x, &mask.size(), "mask")?;
    let m = Mask::new("mask", mask, float_kind("x", x)?)?;
    sum_on(&m, x, dim)
}

/// Mean of `x` over unmasked positions (everything, or along `dim`). An empty mask gives 0, not
/// NaN; the checked entry points reject empty rows before they get here.
pub fn masked_mean(x: &Tensor, mask: &Tensor, dim: Option<i64>) -> Result<Tensor> {
    expect_shape("x", x, &mask.size(), "mask")?;
    let m = Mask::new("mask", mask, float_kind("x", x)?)?;
    mean_on(&m, x, dim)
}

/// Unbiased (Bessel-corrected) variance of the unmasked entries of `x`, as TRL's `masked_var`.
/// Fewer than two entries give 0.
pub fn masked_var(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    expect_shape("x", x, &mask.size(), "mask")?;
    let m = Mask::new("mask", mask, float_kind("x", x)?)?;
    var_on(&m, x)
}

/// Whitening over the unmasked entries: `(x - mean) / sqrt(var + 1e-8)` with the unbiased
/// variance; with `shift_mean = false` the mean is added back (only the scale changes). Masked
/// positions come out as 0.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    expect_shape("x", x, &mask.size(), "mask")?;
    let m = Mask::new("mask", mask, float_kind("x", x)?)?;
    whiten_on(&m, x, shift_mean)
}

pub(crate) fn sum_on(m: &Mask, x: &Tensor, dim: Option<i64>) -> Result<Tensor> {
    let z = m.zero_out(x)?;
    Ok(match dim {
        Some(d) => z.f_sum_dim_intlist(d, false, None::<Kind>)?,
        None => z.f_sum(None::<Kind>)?,
    })
}

pub(crate) fn mean_on(m: &Mask, x: &Tensor, dim: Option<i64>) -> Result<Tensor> {
    let count = match dim {
        Some(d) => m.weight.f_sum_dim_intlist(d, false, None::<Kind>)?,
        None => m.weight.f_sum(None::<Kind>)?,
    };
    Ok(sum_on(m, x, dim)?.f_div(&count.f_clamp_min(1.0)?)?)
}

pub(crate) fn var_on(m: &Mask, x: &Tensor) -> Result<Tensor> {
    let mean = mean_on(m, x, None)?;
    let centered = x.f_sub(&mean)?;
    let ss = sum_on(m, &centered.f_square()?, None)?;
    let count = m.weight.f_sum(None::<Kind>)?;
    Ok(ss.f_div(&count.f_sub_scalar(1.0)?.f_clamp_min(1.0)?)?)
}

pub(crate) fn whiten_on(m: &Mask, x: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = mean_on(m, x, None)?;
    // 1e-8 inside the square root, as TRL and verl, keeps a constant input finite.
    let inv_std = var_on(m, x)?.f_add_scalar(1e-8)?.f_rsqrt()?;
    let mut w = x.f_sub(&mean)?.f_mul(&inv_std)?;
    if !shift_mean {
        w = w.f_add(&mean)?;
    }
    m.zero_out(&w)
}

/// What a failed check reports.
enum Failure {
    NonFinite { values: Tensor, bad: Tensor },
    EmptyRow,
}

/// Per-row failure flags gathered from several checks, fetched to the host in one transfer
/// together with any scalar metrics the caller wants, so a call costs one device sync.
pub(crate) struct Checks {
    entries: Vec<(&'static str, Tensor, Failure)>,
}

impl Checks {
    pub(crate) fn new() -> Self {
        Checks {
            entries: Vec::new(),
        }
    }

    /// Flags NaN and infinities in `x` ((b,) or (b, t)); with a mask only unmasked positions count.
    pub(crate) fn finite(
        &mut self,
        name: &'static str,
        x: &Tensor,
        mask: Option<&Mask>,
    ) -> Result<()> {
        let x = x.f_detach()?;
        let mut bad = x.f_isfinite()?.f_logical_not()?;
        if let Some(m) = mask {
            bad = bad.f_logical_and(&m.on)?;
        }
        let flags = match x.dim() {
            1 => bad.shallow_clone(),
            2 => bad.f_any_dim(1, false)?,
            // (b, ...) -> (b, rest) -> (b,)
            _ => bad.f_flatten(1, -1)?.f_any_dim(1, false)?,
        };
        self.entries
            .push((name, flags, Failure::NonFinite { values: x, bad }));
        Ok(())
    }

    /// Flags rows of `mask` that select no token.
    pub(crate) fn nonempty(&mut self, name: &'static str, mask: &Mask) -> Result<()> {
        let flags = mask.on.f_any_dim(1, false)?.f_logical_not()?;
        self.entries.push((name, flags, Failure::EmptyRow));
        Ok(())
    }

    /// Runs all checks and returns the `extra` scalars (0-d tensors), in one host transfer. The
    /// first failed check becomes the error; finding its exact token costs one more transfer.
    pub(crate) fn run(self, extra: &[&Tensor]) -> Result<Vec<f64>> {
        if self.entries.is_empty() && extra.is_empty() {
            return Ok(Vec::new());
        }
        let mut parts = Vec::with_capacity(self.entries.len() + extra.len());
        for (_, flags, _) in &self.entries {
            parts.push(flags.f_to_kind(Kind::Double)?);
        }
        for x in extra {
            // any shape -> (numel,)
            parts.push(x.f_detach()?.f_reshape([-1])?.f_to_kind(Kind::Double)?);
        }
        let host = Vec::<f64>::try_from(Tensor::f_cat(&parts, 0)?)?;
        let mut offset = 0usize;
        for (name, flags, failure) in &self.entries {
            let n = flags.size().first().copied().unwrap_or(0).max(0) as usize;
            let rows = host.get(offset..offset + n).unwrap_or(&[]);
            if let Some(row) = rows.iter().position(|&f| f != 0.0) {
                return Err(describe(name, row as i64, failure)?);
            }
            offset += n;
        }
        Ok(host.get(offset..).unwrap_or(&[]).to_vec())
    }
}

fn describe(name: &'static str, row: i64, failure: &Failure) -> Result<AlgoError> {
    Ok(match failure {
        Failure::EmptyRow => AlgoError::EmptyRow { tensor: name, row },
        Failure::NonFinite { values, bad } => {
            if values.dim() == 1 {
                let value = values.f_double_value(&[row])?;
                AlgoError::NonFinite {
                    tensor: name,
                    at: Location { row, column: None },
                    value,
                }
            } else {
                let bad_row = Vec::<f64>::try_from(
                    bad.f_select(0, row)?
                        .f_flatten(0, -1)?
                        .f_to_kind(Kind::Double)?,
                )?;
                let col = bad_row.iter().position(|&f| f != 0.0).unwrap_or(0) as i64;
                let value = values
                    .f_select(0, row)?
                    .f_flatten(0, -1)?
                    .f_double_value(&[col])?;
                AlgoError::NonFinite {
                    tensor: name,
                    at: Location {
                        row,
                        column: Some(col),
                    },
                    value,
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let b = rows.len() as i64;
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([b, -1])
    }

    fn scalar(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    #[test]
    fn masked_mean_ignores_nan_padding() {
        let x = t2(&[&[1.0, 2.0, f64::NAN], &[4.0, f64::INFINITY, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
        assert_eq!(scalar(&masked_mean(&x, &m, None).unwrap()), 13.0 / 4.0);
        let rows = Vec::<f64>::try_from(masked_mean(&x, &m, Some(1)).unwrap()).unwrap();
        assert_eq!(rows, vec![1.5, 5.0]);
        assert_eq!(
            scalar(&masked_sum(&x, &m.to_kind(Kind::Bool), None).unwrap()),
            13.0
        );
    }

    #[test]
    fn masked_var_is_bessel_corrected() {
        let x = t2(&[&[1.0, 2.0, 3.0, 100.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        assert!((scalar(&masked_var(&x, &m).unwrap()) - 1.0).abs() < 1e-12);
        let one = t2(&[&[1.0, 0.0, 0.0, 0.0]]);
        assert_eq!(scalar(&masked_var(&x, &one).unwrap()), 0.0);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance_on_the_mask() {
        let x = t2(&[&[1.0, 5.0, -3.0], &[2.0, 9.0, 0.5]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 1.0, 1.0]]);
        let w = masked_whiten(&x, &m, true).unwrap();
        assert!(scalar(&masked_mean(&w, &m, None).unwrap()).abs() < 1e-12);
        assert!((scalar(&masked_var(&w, &m).unwrap()) - 1.0).abs() < 1e-6);
        assert_eq!(w.double_value(&[0, 2]), 0.0);
        let unshifted = masked_whiten(&x, &m, false).unwrap();
        let mean = scalar(&masked_mean(&x, &m, None).unwrap());
        assert!((scalar(&masked_mean(&unshifted, &m, None).unwrap()) - mean).abs() < 1e-9);
    }

    #[test]
    fn checks_name_the_first_bad_row_and_token() {
        let x = t2(&[&[1.0, 2.0, 3.0], &[4.0, f64::NAN, 6.0]]);
        let m = Mask::new(
            "mask",
            &t2(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]),
            Kind::Double,
        )
        .unwrap();
        let mut c = Checks::new();
        c.finite("rewards", &x, Some(&m)).unwrap();
        match c.run(&[]) {
            Err(AlgoError::NonFinite { tensor, at, value }) => {
                assert_eq!(tensor, "rewards");
                assert_eq!(
                    at,
                    Location {
                        row: 1,
                        column: Some(1)
                    }
                );
                assert!(value.is_nan());
            }
            other => panic!("expected a non-finite error, got {other:?}"),
        }
        // The same NaN under the mask's zero is fine, and extras come back in order.
        let m2 = Mask::new(
            "mask",
            &t2(&[&[1.0, 1.0, 1.0], &[1.0, 0.0, 1.0]]),
            Kind::Double,
        )
        .unwrap();
        let mut c = Checks::new();
        c.finite("rewards", &x, Some(&m2)).unwrap();
        c.nonempty("mask", &m2).unwrap();
        let extra = c
            .run(&[&Tensor::from(2.5f64), &Tensor::from(-1.0f64)])
            .unwrap();
        assert_eq!(extra, vec![2.5, -1.0]);
    }

    #[test]
    fn empty_rows_are_reported() {
        let m = Mask::new(
            "response_mask",
            &t2(&[&[1.0, 0.0], &[0.0, 0.0]]),
            Kind::Double,
        )
        .unwrap();
        let mut c = Checks::new();
        c.nonempty("response_mask", &m).unwrap();
        match c.run(&[]) {
            Err(AlgoError::EmptyRow { tensor, row }) => {
                assert_eq!((tensor, row), ("response_mask", 1))
            }
            other => panic!("expected an empty-row error, got {other:?}"),
        }
    }

    #[test]
    fn non_numeric_masks_and_mismatched_shapes_are_errors() {
        let x = t2(&[&[1.0, 2.0]]);
        match masked_mean(&x, &t2(&[&[1.0, 1.0, 1.0]]), None) {
            Err(AlgoError::Shape { tensor, .. }) => assert_eq!(tensor, "x"),
            other => panic!("expected a shape error, got {other:?}"),
        }
        let ids = Tensor::from_slice(&[1i64, 2]).reshape([1, 2]);
        match masked_mean(&ids, &x, None) {
            Err(AlgoError::Kind { tensor, .. }) => assert_eq!(tensor, "x"),
            other => panic!("expected a dtype error, got {other:?}"),
        }
    }
}
