//! Programmatic rewards for verifiable tasks: the response's answer is extracted and compared with
//! the prompt row's reference `answer`. [`ExactMatch`] compares text or the last number;
//! [`MathAnswer`] (in [`math`]) reads math answers (`\boxed{}`, fractions, LaTeX) by value.

pub mod math;

pub use math::MathAnswer;

use crate::roles::{ScoreItem, Scores};

/// A rule reward as a role holds it.
#[derive(Debug, Clone)]
pub enum Rule {
    ExactMatch(ExactMatch),
    Math(MathAnswer),
}

impl Rule {
    /// The name its score is logged under (`models.reward.kind`).
    pub fn name(&self) -> &'static str {
        match self {
            Rule::ExactMatch(_) => "exact_match",
            Rule::Math(_) => "math",
        }
    }

    pub fn score(&self, response: &str, reference: &str) -> f64 {
        match self {
            Rule::ExactMatch(r) => r.score(response, reference),
            Rule::Math(r) => r.score(response, reference),
        }
    }

    /// A Score call's answer: each item's response against its answer, logged under the rule's
    /// name.
    pub fn score_items(&self, items: &[ScoreItem]) -> Result<Scores, tch::TchError> {
        let r: Vec<f32> = items
            .iter()
            .map(|it| self.score(&it.response, &it.answer) as f32)
            .collect();
        Ok(Scores {
            rewards: tch::Tensor::f_from_slice(&r)?,
            attributes: None,
            attribute_names: vec![self.name().into()],
        })
    }
}

/// How the answer is taken from a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extract {
    /// The last number in the response (integers or decimals, optional sign; `1,234` reads as
    /// 1234). Compared numerically with the reference's last number.
    LastNumber,
    /// The text after the last occurrence of the marker (GSM8K's `####`), up to the end of that
    /// line, trimmed.
    AfterMarker,
    /// The whole response, trimmed.
    Full,
}

impl Extract {
    pub fn parse(s: &str) -> Result<Extract, String> {
        match s {
            "last_number" => Ok(Extract::LastNumber),
            "after_marker" => Ok(Extract::AfterMarker),
            "full" => Ok(Extract::Full),
            o => Err(format!("`{o}`: expected last_number, after_marker or full")),
        }
    }
}

/// Exact-match reward: `correct` when the extracted answer equals the reference, else `incorrect`.
#[derive(Debug, Clone)]
pub struct ExactMatch {
    pub extract: Extract,
    pub marker: String,
    pub correct: f64,
    pub incorrect: f64,
}

/// The last number in `s`, if any.
pub fn last_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut end = b.len();
    // Find the last digit, then walk back over digits, separators and one decimal point.
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = b[start - 1];
        let sep =
            (c == b',' || c == b'.') && start >= 2 && b[start - 2].is_ascii_digit() && start < end;
        if c.is_ascii_digit() || sep {
            start -= 1;
        } else {
            break;
        }
    }
    if start > 0 && b[start - 1] == b'-' {
        start -= 1;
    }
    let text: String = s[start..end].chars().filter(|&c| c != ',').collect();
    text.parse().ok()
}

impl ExactMatch {
    fn answer_of<'a>(&self, s: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        match self.extract {
            Extract::Full => Some(s.trim().into()),
            Extract::AfterMarker => {
                let i = s.rfind(self.marker.as_str())?;
                let rest = &s[i + self.marker.len()..];
                Some(rest.lines().next().unwrap_or("").trim().into())
            }
            Extract::LastNumber => None,
        }
    }

    pub fn is_correct(&self, response: &str, reference: &str) -> bool {
        match self.extract {
            Extract::LastNumber => match (last_number(response), last_number(reference)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
            _ => match self.answer_of(response) {
                Some(a) => {
                    let want = if self.extract == Extract::AfterMarker
                        && reference.contains(&self.marker)
                    {
                        self.answer_of(reference).unwrap_or_default()
                    } else {
                        reference.trim().into()
                    };
                    !a.is_empty() && a == want
                }
                None => false,
            },
        }
    }

    pub fn score(&self, response: &str, reference: &str) -> f64 {
        if self.is_correct(response, reference) {
            self.correct
        } else {
            self.incorrect
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(extract: Extract) -> ExactMatch {
        ExactMatch {
            extract,
            marker: "####".into(),
            correct: 1.0,
            incorrect: 0.0,
        }
    }

    #[test]
    fn last_number_reads_signs_separators_and_decimals() {
        assert_eq!(last_number("3 + 4 = 7"), Some(7.0));
        assert_eq!(last_number("it is -12."), Some(-12.0));
        assert_eq!(last_number("total 1,234.5 dollars"), Some(1234.5));
        assert_eq!(last_number("no digits"), None);
        assert_eq!(last_number("12-5"), Some(-5.0)); // a minus directly before: read as sign
    }

    #[test]
    fn exact_match_modes() {
        let r = rule(Extract::LastNumber);
        assert_eq!(r.score("2+3=5", "5"), 1.0);
        assert_eq!(r.score("2+3=6", "5"), 0.0);
        assert_eq!(r.score("", "5"), 0.0);
        assert_eq!(r.score("5.0", "5"), 1.0);
        let m = rule(Extract::AfterMarker);
        assert_eq!(m.score("work...\n#### 42\nbye", "42"), 1.0);
        assert_eq!(m.score("42", "42"), 0.0); // no marker: no answer
        assert_eq!(m.score("#### 42", "steps #### 42"), 1.0);
        let f = rule(Extract::Full);
        assert_eq!(f.score("  Paris \n", "Paris"), 1.0);
        assert_eq!(f.score("Paris.", "Paris"), 0.0);
    }
}
