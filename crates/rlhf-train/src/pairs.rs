//! Preference pairs derived from HelpSteer2 ratings the way the HelpSteer2 paper builds its DPO
//! data (Wang et al. 2024, <https://arxiv.org/abs/2406.08673>, section 4): responses to the
//! same prompt are compared by helpfulness, the more helpful one is chosen, and pairs with
//! equal helpfulness are discarded. HelpSteer2 has two responses per prompt; with more, every
//! pair of responses with different helpfulness becomes a pair.
//!
//! Output rows are generic pairwise JSONL (`prompt`, `chosen`, `rejected`) plus
//! `chosen_helpfulness` and `rejected_helpfulness`; the prompt keeps its original string (with
//! any `<extra_id_1>` turns), so the pairwise reader parses it the same way.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::data::{completion_field, prompt_field, read_rows, OnBadRow, RowOutcome, RowStats};
use crate::error::{Result, TrainError};

/// Counts of a derivation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DerivedPairs {
    /// Distinct prompts.
    pub prompts: u64,
    /// Pairs written.
    pub pairs: u64,
    /// Response pairs discarded because their helpfulness was equal.
    pub discarded_equal: u64,
    /// Prompts with a single response (nothing to pair).
    pub single_response: u64,
    pub data: RowStats,
}

/// Reads ratings rows (`prompt`, `response`, `helpfulness` in 0..4 are required) and writes
/// pairs to `out`, prompts in order of first appearance.
pub fn derive_pairs(input: &Path, on_bad: OnBadRow, out: &mut dyn Write) -> Result<DerivedPairs> {
    let (rows, data) = read_rows(input, on_bad, |v| {
        prompt_field(v, "prompt")?;
        completion_field(v, "response")?;
        let Some(Value::String(prompt)) = v.get("prompt") else {
            return Err("field `prompt` must be a string (HelpSteer2 ratings)".into());
        };
        let Some(Value::String(response)) = v.get("response") else {
            return Err("field `response` must be a string (HelpSteer2 ratings)".into());
        };
        let h = match v.get("helpfulness") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            None | Some(Value::Null) => return Err("missing field `helpfulness`".into()),
            Some(_) => return Err("field `helpfulness` must be a number".into()),
        };
        if !(0.0..=4.0).contains(&h) {
            return Err(format!("rating `helpfulness` = {h} is outside 0..4"));
        }
        Ok(RowOutcome::Use((prompt.clone(), response.clone(), h)))
    })?;
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for (_, (p, r, h)) in rows {
        let g = groups.entry(p.clone()).or_default();
        if g.is_empty() {
            order.push(p);
        }
        g.push((r, h));
    }
    let mut res = DerivedPairs {
        prompts: order.len() as u64,
        pairs: 0,
        discarded_equal: 0,
        single_response: 0,
        data,
    };
    let out_err = |e: std::io::Error| TrainError::io("(pairs output)", e);
    for p in &order {
        let g = &groups[p];
        if g.len() == 1 {
            res.single_response += 1;
            continue;
        }
        for i in 0..g.len() {
            for j in i + 1..g.len() {
                let (a, b) = (&g[i], &g[j]);
                if a.1 == b.1 {
                    res.discarded_equal += 1;
                    continue;
                }
                let (c, r) = if a.1 > b.1 { (a, b) } else { (b, a) };
                let row = json!({
                    "prompt": p, "chosen": c.0, "rejected": r.0,
                    "chosen_helpfulness": c.1, "rejected_helpfulness": r.1,
                });
                writeln!(out, "{row}").map_err(out_err)?;
                res.pairs += 1;
            }
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_helpfulness_is_chosen_and_ties_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.jsonl");
        let rows = [
            json!({"prompt": "p1", "response": "a", "helpfulness": 1, "correctness": 0}),
            json!({"prompt": "p1", "response": "b", "helpfulness": 3}),
            json!({"prompt": "p2", "response": "c", "helpfulness": 2}),
            json!({"prompt": "p2", "response": "d", "helpfulness": 2}),
            json!({"prompt": "p3", "response": "e", "helpfulness": 4}),
        ];
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let mut out = Vec::new();
        let r = derive_pairs(&p, OnBadRow::Fail, &mut out).unwrap();
        assert_eq!(
            (r.prompts, r.pairs, r.discarded_equal, r.single_response),
            (3, 1, 1, 1)
        );
        let line: Value = serde_json::from_slice(out.trim_ascii_end()).unwrap();
        assert_eq!(line["chosen"], "b");
        assert_eq!(line["rejected"], "a");
        assert_eq!(line["prompt"], "p1");
    }
}
