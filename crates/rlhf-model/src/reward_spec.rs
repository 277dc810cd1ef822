//! What a reward model's score head means, stored next to its HF files as `rlhf_reward.json`.
//!
//! A reward model is an HF sequence-classification model (`*ForSequenceClassification`, a
//! `score` head with `num_labels` outputs read at the last non-pad token). The head alone does not
//! say how to turn its outputs into one scalar reward, so the training job writes this file and
//! the reward worker and `rlhf-coord score` read it: a regression (SteerLM) head emits one column
//! per attribute, combined with the goodness weights; a Bradley-Terry head emits one column. Either
//! way the scalar is then normalised with the mean and std measured over the training responses,
//! so serving normalises exactly as trained.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, write_atomic, ModelError, Result};

/// Kind of score head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardHead {
    /// SteerLM multi-attribute regression: one output per attribute (e.g. HelpSteer2's five,
    /// each on a 0..4 scale), trained with MSE.
    Regression,
    /// Bradley-Terry (plain or scaled): one output, trained on preference pairs.
    BradleyTerry,
}

/// The contents of `rlhf_reward.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Format version of this file; currently 1.
    pub format: u32,
    pub head: RewardHead,
    /// Names of the head's output columns, in order (`["reward"]` for Bradley-Terry).
    pub attributes: Vec<String>,
    /// Weights combining attribute columns into the scalar reward (regression heads only; for
    /// HelpSteer2: helpfulness 0.65, correctness 0.8, coherence 0.45). Empty for Bradley-Terry.
    #[serde(default)]
    pub goodness_weights: BTreeMap<String, f64>,
    /// Mean of the scalar reward over the training responses (subtracted when serving).
    pub mean: f64,
    /// Standard deviation of the scalar reward over the training responses (divided by).
    pub std: f64,
}

impl RewardSpec {
    /// The file name inside the model directory.
    pub const FILE: &'static str = "rlhf_reward.json";

    /// Reads `dir/rlhf_reward.json`; `Ok(None)` when the directory has none.
    pub fn load(dir: &Path) -> Result<Option<RewardSpec>> {
        let path = dir.join(Self::FILE);
        if !path.exists() {
            return Ok(None);
        }
        let spec: RewardSpec = read_json(&path)?;
        spec.validate(&path)?;
        Ok(Some(spec))
    }

    /// Writes `dir/rlhf_reward.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(Self::FILE);
        self.validate(&path)?;
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| ModelError::Config {
            path: path.clone(),
            key: "rlhf_reward".into(),
            msg: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
    }

    /// Checks the invariants the reward worker relies on; the error names the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| ModelError::Config {
            path: path.to_path_buf(),
            key: key.into(),
            msg,
        };
        if self.format != 1 {
            return Err(bad(
                "format",
                format!("unsupported version {}, expected 1", self.format),
            ));
        }
        if self.attributes.is_empty() {
            return Err(bad(
                "attributes",
                "must name at least one output column".into(),
            ));
        }
        match self.head {
            RewardHead::BradleyTerry if self.attributes.len() != 1 => {
                return Err(bad(
                    "attributes",
                    format!(
                        "a bradley_terry head has one output, found {} names",
                        self.attributes.len()
                    ),
                ))
            }
            RewardHead::Regression => {
                if self.goodness_weights.is_empty() {
                    return Err(bad(
                        "goodness_weights",
                        "a regression head needs weights to combine its attributes".into(),
                    ));
                }
                for k in self.goodness_weights.keys() {
                    if !self.attributes.contains(k) {
                        return Err(bad(
                            "goodness_weights",
                            format!(
                                "weight for `{k}`, which is not among attributes {:?}",
                                self.attributes
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
        if !self.mean.is_finite() {
            return Err(bad("mean", format!("must be finite, found {}", self.mean)));
        }
        if !(self.std.is_finite() && self.std > 0.0) {
            return Err(bad(
                "std",
                format!("must be finite and > 0, found {}", self.std),
            ));
        }
        Ok(())
    }

    /// Weights per output column, in column order (Bradley-Terry: `[1.0]`).
    pub fn column_weights(&self) -> Vec<f64> {
        match self.head {
            RewardHead::BradleyTerry => vec![1.0],
            RewardHead::Regression => self
                .attributes
                .iter()
                .map(|a| self.goodness_weights.get(a).copied().unwrap_or(0.0))
                .collect(),
        }
    }

    /// The served scalar for one row of head outputs: weighted sum, then `(x - mean) / std`.
    pub fn reward(&self, outputs: &[f64]) -> f64 {
        let raw: f64 = self
            .column_weights()
            .iter()
            .zip(outputs)
            .map(|(w, s)| w * s)
            .sum();
        (raw - self.mean) / self.std
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regression() -> RewardSpec {
        RewardSpec {
            format: 1,
            head: RewardHead::Regression,
            attributes: [
                "helpfulness",
                "correctness",
                "coherence",
                "complexity",
                "verbosity",
            ]
            .map(String::from)
            .to_vec(),
            goodness_weights: [
                ("helpfulness", 0.65),
                ("correctness", 0.8),
                ("coherence", 0.45),
            ]
            .map(|(k, v)| (k.to_string(), v))
            .into(),
            mean: 2.0,
            std: 0.5,
        }
    }

    #[test]
    fn round_trips_and_combines() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RewardSpec::load(dir.path()).unwrap().is_none());
        let s = regression();
        s.save(dir.path()).unwrap();
        assert_eq!(RewardSpec::load(dir.path()).unwrap(), Some(s.clone()));
        // 0.65*1 + 0.8*2 + 0.45*3 = 3.6; (3.6 - 2) / 0.5 = 3.2; complexity and verbosity unweighted.
        assert!((s.reward(&[1.0, 2.0, 3.0, 9.0, 9.0]) - 3.2).abs() < 1e-12);
    }

    #[test]
    fn bad_specs_name_the_key() {
        let p = Path::new("m/rlhf_reward.json");
        let mut s = regression();
        s.goodness_weights.insert("honesty".into(), 1.0);
        let e = s.validate(p).unwrap_err().to_string();
        assert!(
            e.contains("goodness_weights") && e.contains("honesty"),
            "{e}"
        );
        let mut s = regression();
        s.std = 0.0;
        assert!(s.validate(p).unwrap_err().to_string().contains("`std`"));
        let mut s = regression();
        s.head = RewardHead::BradleyTerry;
        assert!(s
            .validate(p)
            .unwrap_err()
            .to_string()
            .contains("one output"));
    }
}
