//! The `math` reward: a math answer taken out of a response and compared with the reference by
//! value, the way MATH / GSM8K answers are written by people and models.
//!
//! The response's answer is the content of its last complete `\boxed{...}` (or `\fbox{...}`;
//! braces nest), else the text after the last marker (GSM8K's `####`) on that line, else the
//! last number-like token (`-1,234.5`, `3/4`, `\frac{1}{2}`, `50%`). The reference's answer is
//! its last `\boxed{...}`, else the text after the marker, else the whole reference.
//!
//! Both are normalized (inline-math delimiters `$...$`, `\(...\)`, `\[...\]`; `\dfrac`/`\tfrac` =
//! `\frac`; `\text{}`, `\mathrm{}`, `\mbox{}` unwrapped; spacing commands, `\left`/`\right`,
//! degrees, `\$` and `%` dropped; `x = 5` read as `5`; trailing units in words dropped; `(B)` =
//! `B`) and then compared as exact rationals when both read as numbers (decimals, thousands
//! separators `1,234` and `1{,}234`, fractions `a/b` and `\frac{a}{b}`, signs, the Unicode minus),
//! element by element when both are tuples `(a, b)` / `[a, b]` of the same length, and as
//! normalized text otherwise. So `0.5`, `1/2`, `\frac{1}{2}` and `\boxed{\dfrac12}` are one
//! answer, while `0.33` and `1/3` are not (no tolerance: the reference is exact), and `50%`
//! equals `50` (a percent sign is dropped, not divided out).

use std::sync::LazyLock;

use regex::Regex;

/// Math-answer reward: `correct` when the response's answer equals the reference's by value,
/// else `incorrect`.
#[derive(Debug, Clone)]
pub struct MathAnswer {
    /// The marker before a final answer (GSM8K's `####`).
    pub marker: String,
    pub correct: f64,
    pub incorrect: f64,
}

impl MathAnswer {
    pub fn is_correct(&self, response: &str, reference: &str) -> bool {
        let Some(got) = response_answer(response, &self.marker) else {
            return false;
        };
        let want = reference_answer(reference, &self.marker);
        equivalent(&got, want)
    }

    pub fn score(&self, response: &str, reference: &str) -> f64 {
        if self.is_correct(response, reference) {
            self.correct
        } else {
            self.incorrect
        }
    }
}

/// The answer a response gives: last `\boxed{}`, else after the marker, else the last
/// number-like token. `None`: the response states no answer.
pub fn response_answer(response: &str, marker: &str) -> Option<String> {
    if let Some(b) = last_boxed(response) {
        return Some(b.to_string());
    }
    if let Some(a) = after_marker(response, marker) {
        return Some(a.to_string());
    }
    // `1{,}000` is LaTeX's thousands separator.
    let text = response.replace("{,}", ",");
    NUMBER_TOKEN
        .find_iter(&text)
        .last()
        .map(|m| m.as_str().to_string())
}

/// The reference's answer: last `\boxed{}`, else after the marker, else the whole text.
pub fn reference_answer<'a>(reference: &'a str, marker: &str) -> &'a str {
    last_boxed(reference)
        .or_else(|| after_marker(reference, marker))
        .unwrap_or(reference)
}

/// The text after the last `marker`, to the end of its line; `None` without a marker or with
/// nothing after it.
fn after_marker<'a>(s: &'a str, marker: &str) -> Option<&'a str> {
    if marker.is_empty() {
        return None;
    }
    let i = s.rfind(marker)?;
    let line = s[i + marker.len()..].lines().next().unwrap_or("").trim();
    (!line.is_empty()).then_some(line)
}

/// The content of the last complete `\boxed{...}` / `\fbox{...}` (nested braces balanced,
/// `\{` and `\}` not counted), or of `\boxed 5` (one token). A box cut off by the token limit is
/// passed over for an earlier complete one.
pub fn last_boxed(s: &str) -> Option<&str> {
    let mut found = None;
    for cmd in ["\\boxed", "\\fbox"] {
        for (i, _) in s.match_indices(cmd) {
            if let Some(content) = box_content(&s[i + cmd.len()..]) {
                let at = i;
                if found.is_none_or(|(j, _)| at > j) {
                    found = Some((at, content));
                }
            }
        }
    }
    found.map(|(_, c)| c)
}

/// What follows `\boxed`: `{...}` balanced, or one space-separated token.
fn box_content(rest: &str) -> Option<&str> {
    if let Some(inner) = rest.strip_prefix('{') {
        let end = matching_brace(inner)?;
        let c = inner[..end].trim();
        return (!c.is_empty()).then_some(c);
    }
    // `\boxed 5`: TeX takes the next token as the argument.
    let rest = rest.strip_prefix(' ')?.trim_start();
    let tok = rest
        .split(|c: char| c.is_whitespace() || c == '$')
        .next()
        .unwrap_or("");
    (!tok.is_empty()).then_some(tok)
}

/// Index in `s` of the `}` that closes an already opened `{`, skipping escaped characters.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// A number-like token in free text, for responses without `\boxed{}` or a marker: a LaTeX
/// fraction, or a signed decimal with optional thousands separators, `/denominator` and `%`.
static NUMBER_TOKEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"[-−]?\\[dt]?frac(?:\{[^{}]*\}\{[^{}]*\}|\d\d)|[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*\\?%)?|[-−]?\.\d+",
    )
    .expect("a valid regex")
});

/// Text commands whose argument is the text itself.
const TEXT_COMMANDS: [&str; 7] = [
    "\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox",
];

/// Removes `\cmd{...}` wrappers, keeping their content (after a space, so `5\text{ cm}` and
/// `5\text{cm}` both read `5 cm`).
fn unwrap_text(s: &str) -> String {
    let mut out = s.to_string();
    loop {
        let hit = TEXT_COMMANDS
            .iter()
            .filter_map(|cmd| {
                let mut from = 0;
                // `\text` must not match the start of `\textbf`: the command ends at `{`.
                while let Some(i) = out[from..].find(cmd) {
                    let at = from + i;
                    let after = at + cmd.len();
                    if out[after..].starts_with('{') {
                        return Some((at, after));
                    }
                    from = after;
                }
                None
            })
            .min();
        let Some((at, open)) = hit else {
            return out;
        };
        let Some(len) = matching_brace(&out[open + 1..]) else {
            return out;
        };
        let content = out[open + 1..open + 1 + len].to_string();
        out.replace_range(at..open + 2 + len, &format!(" {content} "));
    }
}

static SPACING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\left\b|\\right\b|\\displaystyle|\\[!,;:> ]|~|\\quad|\\qquad").expect("regex")
});
static DEGREES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree").expect("regex"));
static TRAILING_WORDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(.*?[\d}])\s+[A-Za-z][A-Za-z ]*$").expect("regex"));
static ASSIGNMENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z](?:_\{?\w+\}?)?=(.+)$").expect("regex"));
static SQRT_SHORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\sqrt(\d|[A-Za-z](?:\b|$))").expect("regex"));
static FRAC_SHORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\frac(\d)(\d)").expect("regex"));
static CHOICE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\(([A-Za-z])\)$").expect("regex"));

/// Strips one pair of delimiters `open ... close` around the whole of `s`.
fn strip_pair<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    s.strip_prefix(open)?.strip_suffix(close)
}

/// The canonical text of an answer: see the module doc for what is dropped and rewritten.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for (open, close) in [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if let Some(inner) = strip_pair(&s, open, close) {
            s = inner.trim().to_string();
            break;
        }
    }
    s = s
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
        .replace('−', "-")
        .replace("{,}", ",");
    s = unwrap_text(&s);
    s = SPACING.replace_all(&s, " ").into_owned();
    s = DEGREES.replace_all(&s, "").into_owned();
    s = s
        .replace("\\%", "")
        .replace('%', "")
        .replace("\\$", "")
        .replace('$', "");
    let t = s.trim().trim_end_matches('.').trim();
    // `18 dollars`, `5 cm`: the words after a number are its unit.
    let t = TRAILING_WORDS
        .captures(t)
        .map_or(t, |c| c.get(1).map_or(t, |m| m.as_str()));
    let mut s: String = t.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(c) = ASSIGNMENT.captures(&s) {
        s = c[1].to_string();
    }
    s = SQRT_SHORT.replace_all(&s, "\\sqrt{$1}").into_owned();
    s = FRAC_SHORT.replace_all(&s, "\\frac{$1}{$2}").into_owned();
    if let Some(c) = CHOICE.captures(&s) {
        s = c[1].to_string();
    }
    s
}

/// An exact rational `num / den`, `den > 0`, in lowest terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    num: i128,
    den: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

impl Rational {
    fn new(num: i128, den: i128) -> Option<Rational> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let sign = if den < 0 { -1 } else { 1 };
        Some(Rational {
            num: sign * num / g,
            den: sign * den / g,
        })
    }

    fn div(self, o: Rational) -> Option<Rational> {
        Rational::new(self.num.checked_mul(o.den)?, self.den.checked_mul(o.num)?)
    }
}

static DECIMAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([+-]?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d*))?$").expect("regex"));

/// A decimal (`-1,234.50`, `.5`, `5.`) as an exact rational. Numbers past i128 are not read.
fn parse_decimal(s: &str) -> Option<Rational> {
    let c = DECIMAL.captures(s)?;
    let int = c[2].replace(',', "");
    let frac = c.get(3).map_or("", |m| m.as_str());
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = format!("{int}{frac}");
    let mut num: i128 = digits.parse().ok()?;
    if &c[1] == "-" {
        num = -num;
    }
    let den = 10i128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    Rational::new(num, den)
}

/// A normalized answer as a number: a decimal, `a/b`, `\frac{a}{b}`, with a leading sign.
pub fn parse_number(s: &str) -> Option<Rational> {
    if let Some(rest) = s.strip_prefix('-') {
        if !rest.starts_with(['-', '+']) {
            if let Some(r) = parse_number(rest) {
                return Rational::new(-r.num, r.den);
            }
        }
    }
    if let Some(rest) = s.strip_prefix("\\frac{") {
        let a_end = matching_brace(rest)?;
        let b = rest[a_end + 1..].strip_prefix('{')?;
        let b_end = matching_brace(b)?;
        if b_end + 1 != b.len() {
            return None;
        }
        return parse_number(&rest[..a_end])?.div(parse_number(&b[..b_end])?);
    }
    if let Some((a, b)) = s.split_once('/') {
        return parse_decimal(a)?.div(parse_decimal(b)?);
    }
    if let Some(inner) = strip_pair(s, "{", "}") {
        return parse_number(inner);
    }
    parse_decimal(s)
}

/// The elements of `(a,b,...)` or `[a,b,...]` split at top-level commas; `None` for anything
/// else, or one element.
fn tuple_elements(s: &str) -> Option<(char, Vec<&str>)> {
    let open = s.chars().next()?;
    let close = match open {
        '(' => ')',
        '[' => ']',
        _ => return None,
    };
    let inner = s.strip_prefix(open)?.strip_suffix(close)?;
    let mut parts = vec![];
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    (parts.len() > 1).then_some((open, parts))
}

fn same_normalized(a: &str, b: &str) -> bool {
    if let (Some(x), Some(y)) = (parse_number(a), parse_number(b)) {
        return x == y;
    }
    if let (Some((oa, ea)), Some((ob, eb))) = (tuple_elements(a), tuple_elements(b)) {
        return oa == ob
            && ea.len() == eb.len()
            && ea.iter().zip(&eb).all(|(x, y)| same_normalized(x, y));
    }
    !a.is_empty() && a == b
}

/// Whether two answers are the same: as numbers, as tuples, or as normalized text.
pub fn equivalent(a: &str, b: &str) -> bool {
    same_normalized(&normalize(a), &normalize(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> MathAnswer {
        MathAnswer {
            marker: "####".into(),
            correct: 1.0,
            incorrect: 0.0,
        }
    }

    /// (response, reference, correct?) — answers as models and datasets write them.
    const CASES: &[(&str, &str, bool)] = &[
        // \boxed{}, nested braces, the last box wins, cut-off boxes passed over
        ("so the answer is \\boxed{42}.", "42", true),
        ("\\boxed{41} no wait \\boxed{42}", "42", true),
        ("\\boxed{42} no wait \\boxed{41}", "42", false),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", true),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", true),
        (
            "\\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{\\sqrt{2}}{2}",
            false,
        ),
        ("\\boxed{7} then \\boxed{8", "7", true),
        ("\\boxed 5", "5", true),
        ("\\fbox{12}", "12", true),
        ("\\boxed{}", "0", false),
        ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}", true),
        // GSM8K: #### on both sides, thousands separators
        (
            "She pays 3*4=12.\n#### 12",
            "3*4=12 <<3*4=12>>\n#### 12",
            true,
        ),
        ("#### 1,234", "1234", true),
        ("#### 1,234", "#### 1234", true),
        ("#### 1235", "#### 1234", false),
        ("The answer: 1{,}000{,}000", "1000000", true),
        // the last number when nothing marks the answer
        ("3 + 4 = 7", "7", true),
        ("3 + 4 = 7, not 8", "7", false),
        ("there are 2/3 left", "\\frac{2}{3}", true),
        ("so half: \\frac{1}{2}.", "0.5", true),
        ("I don't know", "7", false),
        ("", "7", false),
        // fractions and decimals are one value
        ("\\boxed{0.5}", "\\frac{1}{2}", true),
        ("\\boxed{1/2}", "0.5", true),
        ("\\boxed{\\dfrac{1}{2}}", "1/2", true),
        ("\\boxed{\\tfrac12}", "0.5", true),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", true),
        ("\\boxed{.5}", "0.5", true),
        ("\\boxed{5.}", "5", true),
        ("\\boxed{5.00}", "5", true),
        ("\\boxed{0.33}", "\\frac{1}{3}", false),
        ("\\boxed{\\frac{1}{3}}", "\\frac{2}{6}", true),
        ("\\boxed{3/4}", "\\frac{4}{3}", false),
        // signs
        ("\\boxed{-3}", "-3", true),
        ("\\boxed{−3}", "-3", true),
        ("\\boxed{-3}", "3", false),
        ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", true),
        ("\\boxed{-\\frac{1}{2}}", "-0.5", true),
        ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", false),
        ("it drops by -12.", "-12", true),
        // LaTeX dressing: $...$, \text{}, \left/\right, spacing, degrees, units, dollars, percent
        ("$\\frac{3}{4}$", "0.75", true),
        ("\\(x = 5\\)", "5", true),
        ("\\boxed{x=5}", "5", true),
        ("\\boxed{10\\text{ cm}}", "10", true),
        ("\\boxed{\\text{18 dollars}}", "18", true),
        ("\\boxed{\\$18.00}", "18", true),
        ("\\boxed{50\\%}", "50", true),
        ("\\boxed{50\\%}", "0.5", false),
        ("the share is 25%", "25", true),
        ("\\boxed{90^\\circ}", "90", true),
        ("\\boxed{90^{\\circ}}", "90", true),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", true),
        ("\\boxed{(1, 2)}", "(2,1)", false),
        ("\\boxed{[0.5, 3]}", "[\\frac{1}{2},3]", true),
        ("\\boxed{(0.5, 3)}", "[\\frac{1}{2},3]", false),
        ("\\boxed{1\\,000}", "1000", true),
        // text answers compare as normalized text
        ("\\boxed{\\text{(B)}}", "B", true),
        ("\\boxed{\\textbf{C}}", "B", false),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt2", true),
        ("\\boxed{2\\sqrt{2}}", "2\\sqrt3", false),
        ("\\boxed{x^2+1}", "x^2 + 1", true),
        ("\\boxed{x^2+1}", "x^2 - 1", false),
        ("\\boxed{\\pi}", "3.14159", false),
        // near misses
        ("\\boxed{12}", "#### 13", false),
        ("#### 5", "\\boxed{6}", false),
        ("\\boxed{1,234}", "1243", false),
        ("\\boxed{\\frac{1}{2}}", "2", false),
        ("\\boxed{x=6}", "5", false),
        ("\\boxed{10\\text{ cm}}", "100", false),
        ("first 5, then \\frac{1}{4}", "5", false),
        ("it is 2/4", "\\frac{1}{3}", false),
        // the reference's own box
        ("\\boxed{6}", "The total is \\boxed{6}.", true),
        ("\\boxed{7}", "The total is \\boxed{6}.", false),
    ];

    #[test]
    fn math_answers_table() {
        let r = rule();
        let mut wrong = vec![];
        for &(response, reference, want) in CASES {
            if r.is_correct(response, reference) != want {
                wrong.push(format!(
                    "{response:?} vs {reference:?}: expected {}, answer read {:?} = {:?}, reference {:?}",
                    if want { "correct" } else { "incorrect" },
                    response_answer(response, "####"),
                    response_answer(response, "####").map(|a| normalize(&a)),
                    normalize(reference_answer(reference, "####")),
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} cases:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        let correct = CASES.iter().filter(|c| c.2).count();
        let incorrect = CASES.len() - correct;
        assert!(correct >= 20 && incorrect >= 20, "{correct} / {incorrect}");
    }

    #[test]
    fn scores_and_pieces() {
        let r = MathAnswer {
            marker: "The answer is".into(),
            correct: 2.0,
            incorrect: -1.0,
        };
        assert_eq!(r.score("The answer is 1/4\nthanks", "0.25"), 2.0);
        assert_eq!(r.score("The answer is 1/5", "0.25"), -1.0);
        assert_eq!(last_boxed("a \\boxed{b{c}d} e"), Some("b{c}d"));
        assert_eq!(last_boxed("\\boxed{unclosed"), None);
        assert_eq!(parse_number("1,234.5"), Rational::new(12345, 10));
        assert_eq!(parse_number("12,34"), None);
        assert_eq!(parse_number("1/0"), None);
        assert_eq!(
            parse_number("99999999999999999999999999999999999999999"),
            None
        );
        assert_eq!(normalize("$\\dfrac{1}{2}$."), "\\frac{1}{2}");
    }
}
