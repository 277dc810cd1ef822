//! `models.reward.kind: command`: a pool of the user's long-lived processes speaking JSONL on
//! stdin/stdout (docs/rewards.md, "command").
//!
//! `concurrency` processes start with the role, in `workdir`, each in a process group of its
//! own. A Score call deals its rows from one queue: each process takes the next row, gets it as
//! one line of compact JSON on stdin and must answer with one line of JSON on stdout before it
//! takes another, so a slow row holds up one process only and no pipe ever holds more than one
//! row. Per process a writer thread feeds stdin (a row larger than the pipe buffer cannot block
//! the caller past the timeout), a reader thread turns stdout into lines, and a third keeps the
//! last lines of stderr for errors.
//!
//! A process that exits, closes stdout, prints a line that is not JSON (or a line nobody asked
//! for) or takes longer than `timeout` over a row is killed with its group and restarted, and
//! that row is asked again once; a second failure of the same row fails the call, naming the
//! command, the row, both failures and the stderr tail. A JSON answer that the caller's
//! `assemble` refuses is not retried: that is the script's bug, not a crash.
//!
//! Processes never outlive the pool: dropping it kills every process group and reaps the
//! leaders. If the worker itself dies (SIGKILL included), each process gets SIGKILL from the
//! kernel (`PR_SET_PDEATHSIG`, set between fork and exec). That signal follows the *thread*
//! that forked, so every process is started by one spawner thread that lives as long as the
//! pool, never by a short-lived thread of a Score call.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, error, warn};

use crate::error::{RoleError, RoleResult};

/// `RewardRoleSpec.command`, checked.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// The processes' working directory.
    pub workdir: PathBuf,
    /// How long one row's answer may take.
    pub timeout: Duration,
    /// Processes in the pool.
    pub concurrency: usize,
}

impl CommandSpec {
    /// The command as a user would type it, for messages.
    fn shown(&self) -> String {
        self.command
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// "`python3 r.py` in /dir", the prefix of every message about a process.
    fn named(&self) -> String {
        format!("`{}` in {}", self.shown(), self.workdir.display())
    }
}

/// The stderr lines kept per process: enough for a Python traceback, small enough to quote.
const TAIL_LINES: usize = 40;
const TAIL_BYTES: usize = 8 * 1024;
/// The part of the tail quoted in a Score error. The message travels to the coordinator as the
/// gRPC status header, which the client caps at 16 KiB (hyper's default) after percent-encoding
/// (up to 3 bytes per byte); the whole tail goes to the worker's log.
const TAIL_IN_ERROR: usize = 4 * 1024;
/// An answer line longer than this is garbage (a row's answer is a few numbers).
const MAX_LINE: usize = 1 << 20;
/// How much of a garbage line an error quotes.
const QUOTE: usize = 200;
/// How long a process that closed stdout gets to exit (for its status) before it is killed,
/// and how long its stderr gets to reach EOF after it exited.
const GRACE: Duration = Duration::from_secs(1);

/// The last lines a process wrote to stderr (across restarts of its slot, marked).
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, mut line: String) {
        if line.len() > TAIL_BYTES {
            let mut end = TAIL_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || self.bytes > TAIL_BYTES {
            match self.lines.pop_front() {
                Some(l) => self.bytes -= l.len(),
                None => break,
            }
        }
    }

    /// The newest lines, at most `max` bytes of them, each indented.
    fn quoted(&self, max: usize) -> String {
        let mut kept = Vec::new();
        let mut bytes = 0;
        for l in self.lines.iter().rev() {
            if bytes + l.len() > max && !kept.is_empty() {
                break;
            }
            bytes += l.len();
            kept.push(l.as_str());
        }
        kept.reverse();
        if kept.is_empty() {
            return "the process's stderr was empty".into();
        }
        let mut s = String::from("the process's stderr ended with:");
        for l in kept {
            s.push_str("\n  | ");
            s.push_str(l);
        }
        s
    }
}

type SharedTail = Arc<Mutex<Tail>>;

fn lock(t: &SharedTail) -> std::sync::MutexGuard<'_, Tail> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the stdout reader saw.
enum Line {
    /// The complete lines one read returned.
    Text(Vec<Vec<u8>>),
    TooLong,
    Eof,
    ReadError(std::io::Error),
}

/// Why a process failed a row.
enum Fault {
    Start(std::io::Error),
    Exited(ExitStatus),
    ClosedStdout,
    Timeout(Duration),
    NotJson { line: String, error: String },
    TooLong,
    Unasked(String),
    Read(std::io::Error),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Start(e) => write!(f, "the process could not be started: {e}"),
            Fault::Exited(s) => match s.signal() {
                Some(sig) => write!(f, "the process was killed by signal {sig}"),
                None => write!(
                    f,
                    "the process exited ({s}) before answering; a reward process answers every row and keeps reading until stdin closes"
                ),
            },
            Fault::ClosedStdout => write!(f, "the process closed its stdout without answering"),
            Fault::Timeout(t) => write!(
                f,
                "no answer within {} s (models.reward.timeout_s); the process was killed",
                t.as_secs_f64()
            ),
            Fault::NotJson { line, error } => write!(
                f,
                "the process printed a line that is not JSON ({error}): `{line}`; print only answers to stdout, one per line, and logs to stderr"
            ),
            Fault::TooLong => write!(
                f,
                "the process printed more than {} MiB without a line break",
                MAX_LINE >> 20
            ),
            Fault::Unasked(line) => write!(
                f,
                "the process printed a line no row asked for: `{line}`; answer each row with exactly one line, and log to stderr"
            ),
            Fault::Read(e) => write!(f, "reading the process's stdout failed: {e}"),
        }
    }
}

fn quote_bytes(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim_end_matches(['\n', '\r']);
    if s.len() <= QUOTE {
        return s.to_string();
    }
    let mut end = QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// One running process and the threads around its pipes.
struct Proc {
    child: Child,
    /// Lines for the writer thread; dropping it closes the process's stdin.
    rows: Option<Sender<Vec<u8>>>,
    lines: Receiver<Line>,
    /// Disconnects when the stderr thread has read to EOF.
    stderr_done: Receiver<()>,
    /// Set once the leader has been reaped (its pid, and so its group id, may be reused after).
    reaped: Option<ExitStatus>,
}

impl Proc {
    fn spawn(spec: &CommandSpec, slot: usize, tail: &SharedTail) -> std::io::Result<Proc> {
        let parent = std::process::id();
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .current_dir(&spec.workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a kill also reaches what the script starts (sandboxes, shells),
            // and a Ctrl-C at the worker's terminal reaches the worker only.
            .process_group(0);
        // SAFETY: the hook runs in the forked child before exec and only makes two
        // async-signal-safe system calls (prctl, getppid) on plain integers; it allocates
        // nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                // SIGKILL when the spawner thread (the pool) goes away, the worker killed
                // included.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker died between fork and prctl: the signal will never come. (An OS
                // error code, since a message would allocate in the forked child.)
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other("its pipes were not opened"));
                }
            };
        let (rows_tx, rows_rx) = mpsc::channel();
        let (lines_tx, lines_rx) = mpsc::sync_channel(16);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let name = |what: &str| format!("reward-cmd-{slot}-{what}");
        let started = [
            std::thread::Builder::new()
                .name(name("in"))
                .spawn(move || feed(stdin, rows_rx))
                .map(drop),
            std::thread::Builder::new()
                .name(name("out"))
                .spawn(move || read_lines(stdout, lines_tx))
                .map(drop),
            {
                let tail = tail.clone();
                std::thread::Builder::new()
                    .name(name("err"))
                    .spawn(move || keep_tail(stderr, tail, slot, pid, done_tx))
                    .map(drop)
            },
        ];
        let proc = Proc {
            child,
            rows: Some(rows_tx),
            lines: lines_rx,
            stderr_done: done_rx,
            reaped: None,
        };
        for s in started {
            // On error `proc` is dropped, which kills the process.
            s?;
        }
        Ok(proc)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The leader's exit status if it has exited, without reaping it (so its group id stays
    /// ours until [`Proc::kill`]).
    fn exited(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.reaped {
            return Some(s);
        }
        // SAFETY: siginfo_t is plain data, for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into the siginfo_t we own; WNOWAIT leaves the child to be
        // reaped by `Child::wait`, so std's handle stays valid.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid for a WEXITED child and stays 0 when none changed state.
        if r != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        // SAFETY: as above; si_status is the exit code (CLD_EXITED) or the signal.
        let (code, status) = unsafe { (info.si_code, info.si_status()) };
        Some(if code == libc::CLD_EXITED {
            ExitStatus::from_raw((status & 0xff) << 8)
        } else {
            ExitStatus::from_raw(status & 0x7f)
        })
    }

    /// Kills the process group and reaps the leader; waits briefly for stderr to drain.
    fn kill(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            // SAFETY: kill with a negative pid signals the group the leader heads; the leader
            // is not reaped yet, so that id is still ours.
            unsafe {
                libc::kill(-(self.pid() as libc::pid_t), libc::SIGKILL);
            }
            self.reaped = self.child.wait().ok();
        }
        self.rows = None;
        let _ = self.stderr_done.recv_timeout(GRACE);
        self.reaped
    }

    /// Sends one row and waits for its answer line.
    fn ask(&mut self, row: &[u8], timeout: Duration) -> Result<Value, Fault> {
        // A line that arrived since the last answer answers nothing: the rows would shift by one.
        match self.lines.try_recv() {
            Ok(Line::Text(l)) => return Err(Fault::Unasked(quote_bytes(&l[0]))),
            Ok(Line::TooLong) => return Err(Fault::TooLong),
            Ok(Line::Eof) | Err(mpsc::TryRecvError::Disconnected) => return Err(self.ended()),
            Ok(Line::ReadError(e)) => return Err(Fault::Read(e)),
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if let Some(tx) = &self.rows {
            // A writer that stopped (the process closed stdin) shows up below as EOF or exit.
            let _ = tx.send(row.to_vec());
        }
        match self.lines.recv_timeout(timeout) {
            Ok(Line::Text(l)) => {
                if let Some(extra) = l.get(1) {
                    return Err(Fault::Unasked(quote_bytes(extra)));
                }
                serde_json::from_slice(&l[0]).map_err(|e| Fault::NotJson {
                    line: quote_bytes(&l[0]),
                    error: e.to_string(),
                })
            }
            Ok(Line::TooLong) => Err(Fault::TooLong),
            Ok(Line::ReadError(e)) => Err(Fault::Read(e)),
            Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => Err(self.ended()),
            Err(RecvTimeoutError::Timeout) => Err(Fault::Timeout(timeout)),
        }
    }

    /// Stdout reached EOF: the exit status if the process exits within the grace time.
    fn ended(&mut self) -> Fault {
        let until = Instant::now() + GRACE;
        loop {
            if let Some(s) = self.exited() {
                return Fault::Exited(s);
            }
            if Instant::now() >= until {
                return Fault::ClosedStdout;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The writer thread: rows to stdin until the pool drops the sender or the pipe breaks.
fn feed(mut stdin: ChildStdin, rows: Receiver<Vec<u8>>) {
    for row in rows {
        if stdin.write_all(&row).is_err() {
            return;
        }
    }
}

/// The stdout thread: the complete lines of each read as one message (so two lines printed for
/// one row arrive together and are caught), then EOF (or the error).
fn read_lines(mut stdout: impl Read, tx: SyncSender<Line>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stdout.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Line::ReadError(e));
                return;
            }
        };
        if n == 0 {
            // The last line without a line break still counts as a line.
            if !pending.is_empty() {
                let _ = tx.send(Line::Text(vec![std::mem::take(&mut pending)]));
            }
            let _ = tx.send(Line::Eof);
            return;
        }
        pending.extend_from_slice(&chunk[..n]);
        let mut lines = Vec::new();
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let rest = pending.split_off(at + 1);
            lines.push(std::mem::replace(&mut pending, rest));
        }
        if pending.len() > MAX_LINE {
            let _ = tx.send(Line::TooLong);
            return;
        }
        if !lines.is_empty() && tx.send(Line::Text(lines)).is_err() {
            return;
        }
    }
}

/// The stderr thread: every line into the tail (and the worker's debug log) until EOF.
fn keep_tail(stderr: impl Read, tail: SharedTail, slot: usize, pid: u32, _done: Sender<()>) {
    let mut r = BufReader::new(stderr);
    loop {
        let mut buf = Vec::new();
        match r
            .by_ref()
            .take(TAIL_BYTES as u64)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                debug!(process = slot, pid, "reward command stderr: {line}");
                lock(&tail).push(line);
            }
        }
    }
}

/// Starts every process of the pool on one long-lived thread (see the module's note on
/// `PR_SET_PDEATHSIG`).
struct Spawner {
    tx: Option<Sender<(usize, Sender<std::io::Result<Proc>>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    fn new(spec: CommandSpec, tails: Vec<SharedTail>) -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(usize, Sender<std::io::Result<Proc>>)>();
        let thread = std::thread::Builder::new()
            .name("reward-cmd-spawner".into())
            .spawn(move || {
                for (slot, reply) in rx {
                    let _ = reply.send(Proc::spawn(&spec, slot, &tails[slot]));
                }
            })?;
        Ok(Spawner {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn spawn(&self, slot: usize) -> std::io::Result<Proc> {
        let (reply, answer) = mpsc::channel();
        let gone = || std::io::Error::other("the pool's spawner thread is gone");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send((slot, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A row that failed twice: the call's error.
struct Failure {
    row: usize,
    slot: usize,
    first: Fault,
    second: Fault,
}

pub struct CommandPool {
    spec: CommandSpec,
    // Field order: the processes die before the spawner thread ends.
    procs: Vec<Option<Proc>>,
    tails: Vec<SharedTail>,
    spawner: Spawner,
}

impl CommandPool {
    /// Starts `concurrency` processes in `workdir`; an error names the command, the directory
    /// and why (no such directory, program not found, not executable).
    pub fn start(spec: CommandSpec) -> RoleResult<CommandPool> {
        let named = spec.named();
        if spec.command.first().is_none_or(|p| p.is_empty()) {
            return Err(RoleError::Reward(
                "models.reward.kind command: models.reward.command names no program".into(),
            ));
        }
        if !spec.workdir.is_dir() {
            return Err(RoleError::Reward(format!(
                "models.reward.kind command: cannot start {named}: the working directory does not exist; set models.reward.workdir (default: the run file's directory)"
            )));
        }
        let tails: Vec<SharedTail> = (0..spec.concurrency)
            .map(|_| SharedTail::default())
            .collect();
        let spawner = Spawner::new(spec.clone(), tails.clone()).map_err(|e| {
            RoleError::Reward(format!(
                "models.reward.kind command: cannot start a thread for {named}: {e}"
            ))
        })?;
        let mut pool = CommandPool {
            spec,
            procs: Vec::new(),
            tails,
            spawner,
        };
        for slot in 0..pool.spec.concurrency {
            let p = pool.spawner.spawn(slot).map_err(|e| {
                RoleError::Reward(format!(
                    "models.reward.kind command: cannot start {named}: {e}; check models.reward.command (the program must be on PATH, or a path relative to models.reward.workdir, and executable)"
                ))
            })?;
            pool.procs.push(Some(p));
        }
        Ok(pool)
    }

    /// The running processes' ids (tests, logs).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().flatten().map(Proc::pid).collect()
    }

    /// One answer per row, in order: each a parsed JSON line (a number or an object), unchecked.
    pub fn score_rows(&mut self, rows: &[Value]) -> RoleResult<Vec<Value>> {
        let lines: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                // Value's Display is compact JSON: no line breaks outside escaped strings.
                let mut l = r.to_string().into_bytes();
                l.push(b'\n');
                l
            })
            .collect();
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let spec = &self.spec;
        let spawner = &self.spawner;
        let tails = &self.tails;
        let results: Vec<Result<Vec<(usize, Value)>, Failure>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .procs
                .iter_mut()
                .enumerate()
                .map(|(slot, proc)| {
                    let (lines, next, abort) = (&lines, &next, &abort);
                    s.spawn(move || {
                        drive(spec, spawner, &tails[slot], slot, proc, lines, next, abort)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut answers: Vec<Option<Value>> = vec![None; rows.len()];
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(got) => {
                    for (i, v) in got {
                        answers[i] = Some(v);
                    }
                }
                Err(f) => failures.push(f),
            }
        }
        if let Some(f) = failures.iter().min_by_key(|f| f.row) {
            let tail = lock(&self.tails[f.slot]);
            error!(
                process = f.slot,
                row = f.row,
                "reward command failed twice: {}; {}",
                f.second,
                tail.quoted(TAIL_BYTES)
            );
            let others = match failures.len() {
                1 => String::new(),
                2 => "; 1 other process failed as well".to_string(),
                n => format!("; {} other processes failed as well", n - 1),
            };
            let (first, second) = (f.first.to_string(), f.second.to_string());
            let what = if first == second {
                format!(", the second time after a restart: {second}")
            } else {
                format!(": first {first}; after a restart, {second}")
            };
            return Err(RoleError::Reward(format!(
                "models.reward.kind command: row {} failed twice in process {} of {} ({}{others}){what}; {}",
                f.row,
                f.slot,
                self.spec.concurrency,
                self.spec.named(),
                tail.quoted(TAIL_IN_ERROR),
            )));
        }
        answers
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                a.ok_or_else(|| {
                    RoleError::Reward(format!(
                        "models.reward.kind command: row {i} got no answer (the call was aborted)"
                    ))
                })
            })
            .collect()
    }
}

/// One process slot's share of a call: rows from the queue, one at a time, each retried once on
/// a restarted process.
#[allow(clippy::too_many_arguments)]
fn drive(
    spec: &CommandSpec,
    spawner: &Spawner,
    tail: &SharedTail,
    slot: usize,
    proc: &mut Option<Proc>,
    lines: &[Vec<u8>],
    next: &AtomicUsize,
    abort: &AtomicBool,
) -> Result<Vec<(usize, Value)>, Failure> {
    let mut got = Vec::new();
    let mut retry: Option<(usize, Fault)> = None;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Ok(got);
        }
        let (row, first) = match retry.take() {
            Some((row, fault)) => (row, Some(fault)),
            None => {
                let row = next.fetch_add(1, Ordering::Relaxed);
                if row >= lines.len() {
                    return Ok(got);
                }
                (row, None)
            }
        };
        // A process that exited since the last call (or was killed by a failed row) is
        // replaced before it gets a row.
        if let Some(p) = proc {
            if let Some(status) = p.exited() {
                warn!(
                    process = slot,
                    pid = p.pid(),
                    "reward command {} exited between rows ({status}); restarting it",
                    spec.named()
                );
                *proc = None;
            }
        }
        if proc.is_none() {
            lock(tail).push(format!("[rlhf-worker: process {slot} restarted]"));
            match spawner.spawn(slot) {
                Ok(p) => *proc = Some(p),
                Err(e) => {
                    retry = Some(retry_once(row, slot, first, Fault::Start(e), abort)?);
                    continue;
                }
            }
        }
        let Some(p) = proc.as_mut() else {
            continue;
        };
        match p.ask(&lines[row], spec.timeout) {
            Ok(v) => got.push((row, v)),
            Err(fault) => {
                let pid = p.pid();
                p.kill();
                *proc = None;
                let (row, fault) = retry_once(row, slot, first, fault, abort)?;
                warn!(
                    process = slot,
                    pid,
                    row,
                    "reward command {}: {fault}; restarting it and asking the row again",
                    spec.named()
                );
                retry = Some((row, fault));
            }
        }
    }
}

/// Row `row` failed with `fault` in slot `slot`: the first time it is asked again (on a
/// restarted process); the second time the whole call fails, and the other slots stop taking
/// rows.
fn retry_once(
    row: usize,
    slot: usize,
    first: Option<Fault>,
    fault: Fault,
    abort: &AtomicBool,
) -> Result<(usize, Fault), Failure> {
    match first {
        Some(first) => {
            abort.store(true, Ordering::Relaxed);
            Err(Failure {
                row,
                slot,
                first,
                second: fault,
            })
        }
        None => Ok((row, fault)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::external_rewards::{row_json, External, ExternalSpec};
    use crate::roles::ScoreItem;
    use rlhf_model::ChatMessage;
    use serde_json::json;
    use std::path::Path;

    /// A pool running `script` (Python, written into `dir`) with `n` processes.
    fn pool(dir: &Path, script: &str, n: usize, timeout_s: f64) -> RoleResult<CommandPool> {
        std::fs::write(dir.join("reward.py"), script).unwrap();
        CommandPool::start(spec(dir, &["python3", "reward.py"], n, timeout_s))
    }

    fn spec(dir: &Path, command: &[&str], n: usize, timeout_s: f64) -> CommandSpec {
        CommandSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            workdir: dir.to_path_buf(),
            timeout: Duration::from_secs_f64(timeout_s),
            concurrency: n,
        }
    }

    /// Rows whose prompt is `i` and whose `extra` carries `i`.
    fn rows(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                row_json(&ScoreItem {
                    prompt: vec![ChatMessage::new("user", &format!("{i}"))],
                    response: format!("r{i}"),
                    answer: String::new(),
                    extra: serde_json::from_value(json!({"i": i})).unwrap(),
                })
            })
            .collect()
    }

    /// Answers each row with its `extra.i`, after a step given by `MODE` for row `ROW`.
    fn script(mode: &str, row: usize) -> String {
        format!(
            r#"import json, os, sys, time
print("ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    i = json.loads(line)["extra"]["i"]
    if i == {row}:
        mode = "{mode}"
        if mode == "crash_once" and not os.path.exists("crashed"):
            open("crashed", "w").close()
            print("boom on row", i, file=sys.stderr, flush=True)
            sys.exit(3)
        if mode == "crash":
            print("Traceback: ValueError: row", i, "is cursed", file=sys.stderr, flush=True)
            sys.exit(1)
        if mode == "crash_then_garbage":
            if not os.path.exists("crashed"):
                open("crashed", "w").close()
                sys.exit(4)
            print("NaN?", flush=True)
            continue
        if mode == "garbage":
            print("score is", i, flush=True)
            continue
        if mode == "hang":
            time.sleep(60)
    print(json.dumps({{"score": i, "twice": 2 * i}}), flush=True)
"#
        )
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn answers_come_back_in_order_across_the_pool() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = pool(tmp.path(), &script("none", usize::MAX), 4, 30.0).unwrap();
        assert_eq!(p.pids().len(), 4);
        // Long rows: 512 of them are far more than a pipe buffer holds.
        let mut rs = rows(512);
        for r in &mut rs {
            r["response"] = json!("x".repeat(4000));
        }
        for _ in 0..2 {
            let answers = p.score_rows(&rs).unwrap();
            assert_eq!(answers.len(), 512);
            for (i, a) in answers.iter().enumerate() {
                assert_eq!(a["score"], json!(i), "row {i}");
            }
        }
        assert!(p.score_rows(&[]).unwrap().is_empty());
    }

    #[test]
    fn components_reach_the_scores() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("reward.py"), script("none", usize::MAX)).unwrap();
        let mut ext = External::start(&ExternalSpec::Command(spec(
            tmp.path(),
            &["python3", "reward.py"],
            2,
            30.0,
        )))
        .unwrap();
        let items: Vec<ScoreItem> = (0..5)
            .map(|i| ScoreItem {
                prompt: vec![ChatMessage::new("user", "q")],
                response: String::new(),
                answer: String::new(),
                extra: serde_json::from_value(json!({"i": i})).unwrap(),
            })
            .collect();
        let s = ext.score(&items).unwrap();
        assert_eq!(s.attribute_names, ["twice"]);
        assert_eq!(
            Vec::<f32>::try_from(&s.rewards).unwrap(),
            [0.0, 1.0, 2.0, 3.0, 4.0]
        );
        let a = s.attributes.unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&a.reshape([-1])).unwrap(),
            [0.0, 2.0, 4.0, 6.0, 8.0]
        );
    }

    #[test]
    fn a_crash_is_retried_once_on_a_restarted_process() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = pool(tmp.path(), &script("crash_once", 5), 2, 30.0).unwrap();
        let before = p.pids();
        let answers = p.score_rows(&rows(12)).unwrap();
        let got: Vec<i64> = answers
            .iter()
            .map(|a| a["score"].as_i64().unwrap())
            .collect();
        assert_eq!(got, (0..12).collect::<Vec<_>>());
        assert!(tmp.path().join("crashed").exists());
        let after = p.pids();
        assert_eq!(after.len(), 2);
        assert_eq!(before.iter().filter(|p| after.contains(p)).count(), 1);
    }

    #[test]
    fn a_row_that_always_crashes_fails_with_the_stderr_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = pool(tmp.path(), &script("crash", 7), 3, 30.0).unwrap();
        let e = p.score_rows(&rows(10)).unwrap_err().to_string();
        for want in [
            "models.reward.kind command: row 7 failed twice in process",
            "`python3 reward.py` in ",
            "), the second time after a restart: the process exited (exit status: 1) before answering",
            "stderr ended with:\n  | ready\n  | Traceback: ValueError: row 7 is cursed\n  | [rlhf-worker: process",
            "restarted]\n  | ready\n  | Traceback: ValueError: row 7 is cursed",
            "[rlhf-worker: process",
        ] {
            assert!(e.contains(want), "missing {want:?} in: {e}");
        }
        // The pool recovers: the next call restarts the process and scores other rows.
        let answers = p.score_rows(&rows(5)).unwrap();
        assert_eq!(answers[4]["score"], json!(4));
    }

    #[test]
    fn garbage_on_stdout_is_quoted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = pool(tmp.path(), &script("garbage", 2), 1, 30.0).unwrap();
        let e = p.score_rows(&rows(4)).unwrap_err().to_string();
        for want in [
            "row 2 failed twice in process 0 of 1",
            "the process printed a line that is not JSON",
            "`score is 2`",
            "logs to stderr",
            "stderr ended with",
        ] {
            assert!(e.contains(want), "missing {want:?} in: {e}");
        }
        // Two different failures are both told.
        let mut p = pool(tmp.path(), &script("crash_then_garbage", 0), 1, 30.0).unwrap();
        let e = p.score_rows(&rows(1)).unwrap_err().to_string();
        assert!(
            e.contains("row 0 failed twice in process 0 of 1 (`python3 reward.py` in ")
                && e.contains(": first the process exited (exit status: 4) before answering")
                && e.contains("; after a restart, the process printed a line that is not JSON"),
            "{e}"
        );
        // Two lines for one row: the second answers nothing and is caught, not shifted onto
        // the next row. (Written at once here; lines written apart are caught when they arrive
        // before the next row is sent.)
        let two = "import sys\nfor line in sys.stdin:\n    sys.stdout.write('1\\n2\\n'); sys.stdout.flush()\n";
        let mut p = pool(tmp.path(), two, 1, 30.0).unwrap();
        let e = p.score_rows(&rows(3)).unwrap_err().to_string();
        assert!(e.contains("printed a line no row asked for: `2`"), "{e}");
        // A well-formed answer that says nothing useful is not the transport's to judge.
        let words = "import sys\nfor line in sys.stdin:\n    print('\"ok\"', flush=True)\n";
        let mut p = pool(tmp.path(), words, 1, 30.0).unwrap();
        assert_eq!(p.score_rows(&rows(2)).unwrap(), [json!("ok"), json!("ok")]);
    }

    #[test]
    fn a_hanging_row_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = pool(tmp.path(), &script("hang", 1), 2, 0.3).unwrap();
        // Python's start-up must not count against the short timeout of the rows that answer.
        let t = Instant::now();
        while !p
            .tails
            .iter()
            .all(|t| lock(t).lines.iter().any(|l| l == "ready"))
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the processes never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let e = p.score_rows(&rows(4)).unwrap_err().to_string();
        assert!(
            e.contains("row 1 failed twice in process")
                && e.contains("the second time after a restart: no answer within 0.3 s (models.reward.timeout_s)"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn start_failures_name_the_command_and_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let e = CommandPool::start(spec(tmp.path(), &["no-such-reward-program"], 2, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot start `no-such-reward-program` in ")
                && e.contains("No such file or directory")
                && e.contains("check models.reward.command"),
            "{e}"
        );
        let f = tmp.path().join("reward.sh");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        let e = CommandPool::start(spec(tmp.path(), &["./reward.sh"], 1, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("Permission denied"), "{e}");
        let e = CommandPool::start(spec(&tmp.path().join("gone"), &["python3"], 1, 1.0))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("the working directory does not exist") && e.contains("gone"),
            "{e}"
        );
    }

    #[test]
    fn dropping_the_pool_kills_and_reaps_every_process() {
        let tmp = tempfile::tempdir().unwrap();
        // Each process starts a child of its own, which the group kill must reach as well.
        let script = "import subprocess, sys\n\
                      c = subprocess.Popen(['sleep', '600'])\n\
                      print(c.pid, file=sys.stderr, flush=True)\n\
                      for line in sys.stdin:\n    print(c.pid, flush=True)\n";
        let mut p = pool(tmp.path(), script, 3, 30.0).unwrap();
        let pids = p.pids();
        let kids: Vec<u32> = p
            .score_rows(&rows(3))
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert!(pids.iter().chain(&kids).all(|&pid| alive(pid)));
        drop(p);
        // Reaped: not even a zombie is left of the processes the pool started.
        for pid in pids {
            assert!(!alive(pid), "process {pid} outlived the pool");
        }
        // Their children got SIGKILL too: gone, or a zombie until whoever adopted them reaps
        // them, within moments (a killed process may still show as running while it exits).
        for pid in kids {
            let t = Instant::now();
            loop {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let running = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'));
                if !running {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "grandchild {pid} outlived the pool: {stat}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
