//! The documented command lines against the real CLI, so the README, the docs and `--help`
//! cannot drift from it: every `rlhf-coord ...` line of a code block in README.md and docs/*.md,
//! and every example in a subcommand's `--help`, is parsed by the binary. Synopsis notation is
//! expanded into concrete command lines (`[...]` included, each alternative of `a | b` and
//! `(a | b)` tried once, `x|y` values take the first, upper-case placeholders after a flag become
//! `1`), then run with `--help` appended: clap parses every argument before it handles `--help`,
//! so an unknown subcommand or flag, a missing flag value or a value of the wrong type fails,
//! while nothing is executed. Every subcommand's help must show examples, and every option and
//! argument a description.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf-coord"));
    c.env("RLHF_LOG", "warn");
    c
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `rlhf-coord` lines of the fenced code blocks of a Markdown text, continuation lines joined,
/// trailing `# comments` cut.
fn command_lines(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<String> = None;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            pending = None;
            continue;
        }
        if !in_block {
            continue;
        }
        let text = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        }
        .trim();
        let joined = match pending.take() {
            Some(p) => format!("{p} {text}"),
            None if text.starts_with("rlhf-coord ") => text.to_string(),
            None => continue,
        };
        match joined.strip_suffix('\\') {
            Some(head) => pending = Some(head.trim_end().to_string()),
            None => out.push(joined),
        }
    }
    out
}

/// Splits an example as a POSIX shell would for the quoting examples use ('…' and "…").
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(word);
    out
}

/// Synopsis notation: words, and groups of alternatives (`[a | b]` optional, `(a | b)` not).
#[derive(Debug)]
enum Node {
    Word(String),
    Group(Vec<Vec<Node>>),
}

fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in line.split_whitespace() {
        // `[--set k=v]...`: the repetition mark is dropped (one occurrence is checked).
        let mut w = word
            .strip_suffix("...")
            .filter(|w| !w.is_empty())
            .unwrap_or(word);
        while let Some(rest) = w.strip_prefix(['[', '(']) {
            out.push(w[..1].to_string());
            w = rest;
        }
        // `ROWS.jsonl[.gz]`: an optional part inside a word is left out.
        let owned;
        if let Some(i) = w.find('[').filter(|&i| i > 0) {
            if let Some(j) = w[i..].find(']') {
                owned = format!("{}{}", &w[..i], &w[i + j + 1..]);
                w = &owned;
            }
        }
        let mut closing = Vec::new();
        while let Some(rest) = w.strip_suffix([']', ')']) {
            closing.push(w[w.len() - 1..].to_string());
            w = rest;
        }
        if !w.is_empty() {
            out.push(w.to_string());
        }
        out.extend(closing.into_iter().rev());
    }
    out
}

/// Parses a sequence up to a closing bracket (or the end), splitting it at top-level `|`.
fn parse_alts(toks: &[String], i: &mut usize) -> Vec<Vec<Node>> {
    let mut alts = vec![Vec::new()];
    while *i < toks.len() {
        let t = toks[*i].as_str();
        *i += 1;
        match t {
            "]" | ")" => return alts,
            "|" => alts.push(Vec::new()),
            "[" | "(" => {
                let g = parse_alts(toks, i);
                alts.last_mut().unwrap().push(Node::Group(g));
            }
            w => alts.last_mut().unwrap().push(Node::Word(w.to_string())),
        }
    }
    alts
}

/// The base expansion (every group's first alternative) and one variant per other alternative.
fn expand(seq: &[Node]) -> Vec<Vec<String>> {
    let per_node: Vec<Vec<Vec<String>>> = seq
        .iter()
        .map(|n| match n {
            Node::Word(w) => vec![vec![w.clone()]],
            Node::Group(alts) => alts.iter().flat_map(|a| expand(a)).collect(),
        })
        .collect();
    let base: Vec<String> = per_node.iter().flat_map(|v| v[0].clone()).collect();
    let mut out = vec![base];
    for (k, variants) in per_node.iter().enumerate() {
        for v in &variants[1..] {
            out.push(
                per_node
                    .iter()
                    .enumerate()
                    .flat_map(|(j, vs)| if j == k { v.clone() } else { vs[0].clone() })
                    .collect(),
            );
        }
    }
    out
}

/// Concrete arguments (after `rlhf-coord`) for a synopsis or example line.
fn variants(line: &str) -> Vec<Vec<String>> {
    let toks = tokens(line.strip_prefix("rlhf-coord").unwrap_or(line));
    let alts = parse_alts(&toks, &mut 0);
    let mut out = Vec::new();
    for alt in &alts {
        for v in expand(alt) {
            let mut args: Vec<String> = Vec::new();
            for w in v {
                let after_flag = args.last().is_some_and(|a| a.starts_with("--"));
                if w == "..." {
                    // `--dtype ...` stands for a value; a lone `...` for "and so on".
                    if after_flag {
                        args.push("x".into());
                    }
                    continue;
                }
                // `llama|mistral|qwen2`: one of these values.
                let w = w.split('|').next().unwrap_or("").to_string();
                let placeholder = w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    && w.chars().next().is_some_and(|c| c.is_ascii_uppercase());
                if after_flag && placeholder {
                    args.push("1".into());
                } else {
                    args.push(w);
                }
            }
            out.push(args);
        }
    }
    out
}

/// Runs `rlhf-coord ARGS --help`; the error names the line and clap's complaint.
fn parses(origin: &str, line: &str, args: &[String]) -> Result<(), String> {
    let out = bin().args(args).arg("--help").output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{origin}: `{line}`\n  as `rlhf-coord {} --help`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn help(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "rlhf-coord {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `rlhf-coord --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let text = help(&["--help"]);
    let mut out = Vec::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                break;
            }
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" && line.starts_with("  ") && !line.starts_with("   ") {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn synopsis_expansion_covers_each_alternative() {
    let v = variants(
        "rlhf-coord export RUN_DIR [--step N | --best | --latest] --out DIR [--adapter-only]",
    );
    let lines: Vec<String> = v.iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        lines,
        [
            "export RUN_DIR --step 1 --out 1 --adapter-only",
            "export RUN_DIR --best --out 1 --adapter-only",
            "export RUN_DIR --latest --out 1 --adapter-only",
        ]
    );
    let v = variants("rlhf-coord generate M (--prompt TEXT | --prompts F.jsonl) --dtype ... [--x]");
    assert_eq!(v[1].join(" "), "generate M --prompts F.jsonl --dtype x --x");
    let md =
        "text\n```sh\nrlhf-coord a --b \\\n    --c   # note\necho rlhf-coord\n```\nrlhf-coord no\n";
    assert_eq!(command_lines(md), ["rlhf-coord a --b --c"]);
    assert_eq!(
        shell_words(r#"rlhf-coord g --prompt 'What is it?' --x "a b" ''"#),
        [
            "rlhf-coord",
            "g",
            "--prompt",
            "What is it?",
            "--x",
            "a b",
            ""
        ]
    );
}

#[test]
fn readme_and_docs_command_lines_parse() {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut readme_commands = std::collections::BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        for line in command_lines(&text) {
            for args in variants(&line) {
                if name == "README.md" {
                    readme_commands.insert(args[0].clone());
                }
                checked += 1;
                if let Err(e) = parses(&name, &line, &args) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The README shows every command.
    let missing: Vec<String> = subcommands()
        .into_iter()
        .filter(|c| !readme_commands.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "commands without a line in the README's code blocks: {missing:?}"
    );
    assert!(checked >= 20, "only {checked} command lines found");
}

#[test]
fn every_command_has_parsing_examples_and_described_options() {
    let commands = subcommands();
    assert!(commands.len() >= 11, "{commands:?}");
    let mut failures = Vec::new();
    for c in &commands {
        let text = help(&[c, "--help"]);
        // Examples: the lines after "Examples:", each a command line of this subcommand.
        let examples: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Examples:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .map(str::trim)
            .collect();
        if examples.is_empty() {
            failures.push(format!(
                "`rlhf-coord {c} --help` shows no Examples: section"
            ));
        }
        for e in examples {
            if !e.starts_with(&format!("rlhf-coord {c} ")) {
                failures.push(format!("{c} --help: example `{e}` is not a `{c}` command"));
                continue;
            }
            let args: Vec<String> = shell_words(e).into_iter().skip(1).collect();
            if let Err(e) = parses(&format!("{c} --help"), e, &args) {
                failures.push(e);
            }
        }
        // Every option and argument has a description (in -h's one-line form).
        let short = help(&[c, "-h"]);
        let mut section = false;
        let mut entry: Option<(String, bool)> = None;
        let mut close = |entry: &mut Option<(String, bool)>| {
            if let Some((spec, false)) = entry.take() {
                failures.push(format!("`rlhf-coord {c}`: `{spec}` has no description"));
            }
        };
        for line in short.lines() {
            if line.starts_with("Options:") || line.starts_with("Arguments:") {
                section = true;
                continue;
            }
            if !line.starts_with(' ') {
                close(&mut entry);
                section = false;
                continue;
            }
            if !section {
                continue;
            }
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if indent <= 6 && (trimmed.starts_with('-') || trimmed.starts_with(['<', '['])) {
                close(&mut entry);
                let mut parts = trimmed.splitn(2, "  ");
                let spec = parts.next().unwrap_or("").to_string();
                let described = parts.next().is_some_and(|d| {
                    let d = d.trim();
                    !d.is_empty() && !d.starts_with("[default") && !d.starts_with("[possible")
                });
                entry = Some((spec, described));
            } else if let Some((_, described)) = &mut entry {
                let d = trimmed.trim();
                if !d.is_empty() && !d.starts_with("[default") && !d.starts_with("[possible") {
                    *described = true;
                }
            }
        }
        close(&mut entry);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn launch_help_names_exit_codes_and_where_the_model_goes() {
    let text = help(&["launch", "--help"]);
    for needle in ["75", "76", "rlhf-coord export"] {
        assert!(
            text.contains(needle),
            "launch --help lacks {needle}:\n{text}"
        );
    }
    let text = help(&["generate", "--help"]);
    assert!(
        text.contains("--chat renders each prompt with the model's chat template"),
        "{text}"
    );
}
