//! A real `rlhf-worker` daemon for the tests of this crate, started with no coordinator: it
//! serves while it keeps trying to register, and gives up after `register_timeout_s`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The run token the tests' daemons accept.
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Starts a daemon named `name` that serves paths under the system's temporary directory
/// (where the tests make their models); returns it and the address it logged it listens on.
pub fn spawn_daemon(name: &str, register_timeout_s: u32) -> (Child, String) {
    spawn_daemon_in(name, register_timeout_s, &[std::env::temp_dir().as_path()])
}

/// [`spawn_daemon`] allowed only `roots` (`--allow-root`).
pub fn spawn_daemon_in(name: &str, register_timeout_s: u32, roots: &[&Path]) -> (Child, String) {
    let mut extra: Vec<String> = vec![];
    for r in roots {
        extra.push("--allow-root".into());
        extra.push(r.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // Nobody listens here: the daemon serves while it keeps trying to register.
    spawn_daemon_with(name, register_timeout_s, "127.0.0.1:9", &extra)
}

/// [`spawn_daemon`] with a coordinator address and extra flags (`--tls-dir DIR`, `--allow-root
/// DIR`). Its log is drained on a thread so it never writes into a closed pipe.
pub fn spawn_daemon_with(
    name: &str,
    register_timeout_s: u32,
    coordinator: &str,
    extra: &[&str],
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .env("RLHF_RUN_TOKEN", TOKEN)
        .env("RLHF_LOG", "info")
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RLHF_LOG_FORMAT")
        .env_remove("RLHF_TLS_DIR")
        .args(["--coordinator", coordinator, "--name", name])
        .args(["--register-timeout-s", &register_timeout_s.to_string()])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = None;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(i) = line.find("address=") {
            addr = Some(line[i + 8..].split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr.expect("the worker logs its listening address"))
}

/// The venv interpreter of scripts/setup-torch.sh (as rlhf-coord's tests find it), else `python3`.
pub fn python() -> std::path::PathBuf {
    if let Ok(v) = std::env::var("RLHF_TORCH_VENV") {
        let p = Path::new(&v).join("bin/python");
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cache/rlhf-coord/torch-venv/bin/python");
    if p.exists() {
        return p;
    }
    "python3".into()
}
