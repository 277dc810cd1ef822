//! The daemon's start-up and stop edges with a real `rlhf-worker` process: registering with a
//! coordinator that accepts the connection but never answers ends within the registration
//! deadline, naming the address; SIGTERM (what Slurm sends every task of a preempted job) does
//! not stop a worker, a second SIGINT does.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn send(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child this test spawned; no memory is shared.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn a_coordinator_that_never_answers_does_not_hang_registration() {
    // Accepts connections and keeps them open without a byte of HTTP/2 in reply.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut open = vec![];
        for c in silent.incoming().take(8) {
            open.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .env("RLHF_RUN_TOKEN", common::TOKEN)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RLHF_LOG_FORMAT")
        .args(["--coordinator", &addr, "--name", "w"])
        .args(["--register-timeout-s", "3"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the worker still waits for a silent coordinator after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    assert!(err.contains(&format!("coordinator at {addr}")), "{err}");
    assert!(
        err.contains("never answered") || err.contains("could not reach"),
        "{err}"
    );
    drop(held);
}

#[test]
fn sigterm_is_held_and_a_second_sigint_stops() {
    let (mut child, _addr) = common::spawn_daemon("w", 60);
    let pid = child.id();
    send(pid, libc::SIGTERM);
    send(pid, libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGTERM/SIGUSR1 stopped the worker while its coordinator may still need it"
    );
    send(pid, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "one SIGINT stopped it");
    send(pid, libc::SIGINT);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "a second SIGINT did not stop the worker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
