//! Errors as the two binaries print them when they exit: the error and its causes on one line,
//! each said once.

use std::fmt::Display;

/// The error and its causes (outermost first) joined by `: `, skipping a cause whose text is
/// already there: the library error types put their source into their own message (so a log
/// line or a gRPC status is whole on its own), and a plain chain would print that source twice
/// ("No such file or directory (os error 2): No such file or directory (os error 2)").
pub fn one_line<I>(causes: I) -> String
where
    I: IntoIterator,
    I::Item: Display,
{
    let mut out = String::new();
    for cause in causes {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let os = "No such file or directory (os error 2)";
        let own = format!("reading run.yaml: {os}");
        assert_eq!(
            one_line([&own, &own, &os.to_string()]),
            format!("reading run.yaml: {os}")
        );
        assert_eq!(
            one_line(["launch failed", "worker `a` died"]),
            "launch failed: worker `a` died"
        );
    }
}
