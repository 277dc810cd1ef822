//! The run directory lock: a second holder is refused naming the first's host and pid, a lock
//! whose holder process was killed is taken over (the kernel released it), and a clean release
//! leaves nothing stale.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_ckpt::{CkptError, RunLock, LOCK_FILE};

#[test]
fn a_second_launch_is_refused_naming_host_and_pid() {
    let run = tempfile::tempdir().unwrap();
    let _held = RunLock::acquire(run.path(), "node-7").unwrap();
    match RunLock::acquire(run.path(), "node-8") {
        Err(CkptError::Locked { dir, holder }) => {
            assert_eq!(dir, run.path());
            assert!(holder.contains("host node-7"), "{holder}");
            assert!(
                holder.contains(&format!("pid {}", std::process::id())),
                "{holder}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn the_lock_of_a_killed_process_is_taken_over() {
    let run = tempfile::tempdir().unwrap();
    let file = run.path().join(LOCK_FILE);
    // Another process holds the same flock(2) (util-linux `flock`), having written its name the
    // way a launch does; then it is killed with SIGKILL, as a preempted or requeued job is.
    std::fs::write(&file, br#"{"host":"dead-node","pid":4242,"since_unix":1}"#).unwrap();
    let mut holder = Command::new("flock")
        .arg(&file)
        .args(["sleep", "60"])
        .stdout(Stdio::null())
        // Its own process group, killed whole below: `sleep` inherits the locked descriptor.
        .process_group(0)
        .spawn()
        .expect("util-linux flock(1) is on PATH");
    // Wait until it holds the lock.
    let t0 = Instant::now();
    loop {
        match RunLock::acquire(run.path(), "here") {
            Err(CkptError::Locked { holder: h, .. }) => {
                assert!(h.contains("dead-node") && h.contains("4242"), "{h}");
                break;
            }
            Ok(l) => {
                drop(l);
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "flock never took the lock"
                );
                // flock(1) has not locked yet; put the name back and retry.
                std::fs::write(&file, br#"{"host":"dead-node","pid":4242,"since_unix":1}"#)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let group = format!("-{}", holder.id());
    let killed = Command::new("kill")
        .args(["-KILL", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success());
    holder.wait().unwrap();
    // `sleep`, killed with it but not our child, may take a moment more to exit.
    let t0 = Instant::now();
    let l = loop {
        match RunLock::acquire(run.path(), "here") {
            Ok(l) => break l,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                panic!("the lock of the killed process was not released: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let old = l.took_over().expect("the dead holder's name is reported");
    assert_eq!((old.host.as_str(), old.pid), ("dead-node", 4242));
}
