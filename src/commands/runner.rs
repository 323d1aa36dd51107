//! Running one process: never a shell, a cleared environment, a fixed working
//! directory, its own process group, stdout and stderr merged into one pipe.
//!
//! Invariants:
//! - The process is the leader of a new process group; every signal goes to
//!   the whole group (`killpg`), so grandchildren are reached too.
//! - Timeout and cancel send SIGTERM, then SIGKILL after `kill_grace`.
//! - When the leader exits, whatever is left of its group is SIGKILLed: no
//!   process of a command outlives the run.
//! - The leader is always reaped (no zombie). After it exits, the pipe is
//!   drained for at most [`DRAIN_AFTER_EXIT`]: a process that escaped the group
//!   (`setsid`) and keeps the pipe open cannot hold the job forever.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::{sleep, Instant, Sleep};

/// How long the pipe is still read after the process group is gone.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Program (path or name looked up in the allowed `PATH`).
    pub program: String,
    /// Arguments, each passed as one argv entry.
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The complete environment of the process.
    pub env: Vec<(String, String)>,
    /// Run time limit.
    pub timeout: Duration,
    /// SIGTERM → SIGKILL delay.
    pub kill_grace: Duration,
}

/// How a run ended.
#[derive(Debug)]
pub enum End {
    /// The process exited by itself.
    Exited(ExitStatus),
    /// The timeout fired and the group was killed.
    TimedOut,
    /// Cancelled, with the reason given.
    Cancelled(String),
    /// The process could not be started.
    SpawnFailed(String),
    /// A runner's own rules refused the job (`execute = "runners"`).
    Rejected(String),
    /// Its runner missed its lease (`execute = "runners"`).
    Lost(String),
}

/// Receives what the process does.
pub trait Sink: Send + Sync {
    /// The process started with this pid (= process group id).
    fn started(&self, pid: u32);
    /// The process wrote these bytes (stdout and stderr merged).
    fn output(&self, bytes: &[u8]);
}

/// Sends `sig` to process group `pgid`. Errors (the group is gone) are ignored.
pub fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: killpg only sends a signal; pgid > 1 is a group this module
    // created (or, at restart, one verified by its leader's start time).
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// The start time (clock ticks since boot) of process `pid`, from
/// `/proc/<pid>/stat`; used to recognise a process after a restart.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    // Fields after `comm` start at field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded; both descriptors are new and owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn arm(slot: &mut Option<Pin<Box<Sleep>>>, after: Duration) {
    *slot = Some(Box::pin(sleep(after)));
}

async fn fire(slot: &mut Option<Pin<Box<Sleep>>>) {
    match slot {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Runs `plan` to its end. `cancel` carries a reason once someone asks for
/// the run to stop.
pub async fn run(plan: &Plan, sink: &dyn Sink, mut cancel: watch::Receiver<Option<String>>) -> End {
    if let Some(reason) = cancel.borrow_and_update().clone() {
        return End::Cancelled(reason);
    }
    let mut cancel_open = true;
    let (read_end, write_end) = match pipe() {
        Ok(p) => p,
        Err(err) => return End::SpawnFailed(format!("cannot create pipe: {err}")),
    };
    let write_err = match write_end.try_clone() {
        Ok(w) => w,
        Err(err) => return End::SpawnFailed(format!("cannot create pipe: {err}")),
    };
    let mut cmd = tokio::process::Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_err))
        .process_group(0)
        .kill_on_drop(false);
    let spawned = cmd.spawn();
    // The Command holds the pipe's write ends: drop it so only the child has them.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(err) => {
            return End::SpawnFailed(format!(
                "could not start {:?}: {}",
                plan.program,
                err.kind()
            ))
        }
    };
    let Some(pid) = child.id() else {
        return End::SpawnFailed("process vanished at start".into());
    };
    sink.started(pid);
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(read_end) {
        Ok(r) => Some(r),
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch command output");
            None
        }
    };

    let mut buf = vec![0u8; 16 * 1024];
    let deadline = sleep(plan.timeout);
    tokio::pin!(deadline);
    let mut stopping: Option<End> = None;
    let mut kill_timer: Option<Pin<Box<Sleep>>> = None;
    let mut drain_timer: Option<Pin<Box<Sleep>>> = None;
    let mut exit: Option<io::Result<ExitStatus>> = None;
    let started = Instant::now();

    loop {
        if exit.is_some() && reader.is_none() {
            break;
        }
        tokio::select! {
            r = async { match reader.as_mut() { Some(rd) => rd.read(&mut buf).await, None => std::future::pending().await } }, if reader.is_some() => {
                match r {
                    Ok(0) | Err(_) => reader = None,
                    Ok(n) => sink.output(buf.get(..n).unwrap_or_default()),
                }
            }
            status = child.wait(), if exit.is_none() => {
                // Leader gone: nothing of its group may outlive it.
                signal_group(pid, libc::SIGKILL);
                exit = Some(status);
                arm(&mut drain_timer, DRAIN_AFTER_EXIT);
            }
            _ = &mut deadline, if exit.is_none() && stopping.is_none() => {
                tracing::info!(pid, elapsed_ms = started.elapsed().as_millis() as u64, "command timed out; terminating its process group");
                stopping = Some(End::TimedOut);
                signal_group(pid, libc::SIGTERM);
                arm(&mut kill_timer, plan.kill_grace);
            }
            changed = cancel.changed(), if cancel_open && exit.is_none() && stopping.is_none() => {
                if changed.is_err() {
                    // The sender is gone: nobody can cancel any more; keep running.
                    cancel_open = false;
                } else if let Some(reason) = cancel.borrow_and_update().clone() {
                    stopping = Some(End::Cancelled(reason));
                    signal_group(pid, libc::SIGTERM);
                    arm(&mut kill_timer, plan.kill_grace);
                }
            }
            _ = fire(&mut kill_timer), if exit.is_none() => {
                signal_group(pid, libc::SIGKILL);
                kill_timer = None;
            }
            _ = fire(&mut drain_timer) => {
                reader = None;
            }
        }
    }
    match (stopping, exit) {
        (Some(end), _) => end,
        (None, Some(Ok(status))) => End::Exited(status),
        (None, Some(Err(err))) => End::SpawnFailed(format!("lost track of the process: {err}")),
        (None, None) => End::SpawnFailed("lost track of the process".into()),
    }
}
