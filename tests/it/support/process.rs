//! Child processes (the compiled binary, Python servers) and process-wide
//! facts: guards that kill and reap, free ports, open-file limits, peak memory,
//! and the panic watch.

use super::TIMEOUT;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;

/// Kills and reaps a child process when dropped (also on panic).
pub struct ChildGuard(pub Option<std::process::Child>);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).expect("child running")
    }

    pub fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child running")
    }
}

impl ChildGuard {
    /// Kills the process at once (SIGKILL) and reaps it; nothing when it was
    /// already stopped.
    pub fn kill_now(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A loopback port that was free a moment ago, for a child process to bind.
///
/// Taken below Linux's ephemeral range (32768–60999 by default): a port the
/// kernel handed out for `bind(…:0)` or as the local end of an outgoing
/// connection could be taken again by a concurrent test before the child
/// binds it; a port outside that range is only ever taken on purpose.
pub fn free_port() -> u16 {
    for _ in 0..1_000 {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, child: &mut ChildGuard) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.child().try_wait() {
            panic!("process exited before listening on {addr}: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails with a clear message when `python3` or its `cryptography` package is missing.
pub fn require_python(with_cryptography: bool) {
    let check = if with_cryptography {
        "import cryptography"
    } else {
        "import sys"
    };
    let out = std::process::Command::new("python3")
        .args(["-c", check])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot `{check}`: {}\nrun the tests with scripts/test, which installs it (python3 -m pip install 'cryptography>=41')",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("python3 is required by this test and could not be started: {e}"),
    }
}

/// The peak resident set size (`VmHWM`) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Panics seen outside the test files (gateway tasks, hyper, h2, tokio).
static FOREIGN_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs (once per test binary) a panic hook that records every panic
/// raised outside `tests/` — from any thread, including the gateway's own
/// tasks, which tokio would otherwise swallow — and then runs the default
/// hook. Test assertions (located in `tests/`) are not recorded.
pub fn watch_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if !file.starts_with("tests/") && !file.contains("/tests/") {
                let thread = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_owned();
                if let Ok(mut p) = FOREIGN_PANICS.lock() {
                    p.push(format!("thread {thread}: {info}"));
                }
            }
            previous(info);
        }));
    });
}

/// Fails if any panic was recorded by [`watch_panics`] in this test binary.
pub fn assert_no_panics() {
    let seen = FOREIGN_PANICS
        .lock()
        .map(|p| p.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    assert!(seen.is_empty(), "panics outside the tests: {seen:#?}");
}

/// Raises this process's soft open-files limit to `want` (capped by the hard
/// limit); returns the soft limit in force afterwards.
// `rlim_t` is `u64` on Linux but not on every platform.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_files(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if (lim.rlim_cur as u64) < want {
            let new = libc::rlimit {
                rlim_cur: want.min(lim.rlim_max as u64) as libc::rlim_t,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                lim = new;
            }
        }
    }
    lim.rlim_cur as u64
}

/// The soft limit on open files of this process (`ulimit -n` of a child shell).
pub fn open_files_limit() -> u64 {
    std::process::Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// Whether any process on the machine has `needle` in its command line.
pub fn process_with(needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                // Zombies have an empty cmdline, so this is a live process.
                return true;
            }
        }
    }
    false
}

/// Zombie children of this test process.
pub fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 1..)) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next() == Some(me.as_str())
        })
        .count()
}

/// Waits until a process has `needle` in its command line (at most 5 s):
/// a job's process starts a moment after its `accepted` line.
pub async fn process_appears(needle: &str) -> bool {
    for _ in 0..100 {
        if process_with(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits until no process has `needle` in its command line (at most 15 s).
pub async fn no_process_with(needle: &str) -> bool {
    // Up to 15 s: a loaded machine (CI, parallel builds) can be slow to
    // deliver the kill and let the process go.
    for _ in 0..300 {
        if !process_with(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The compiled `portcullis` binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A loopback address whose port was free a moment ago (for a child process
/// that must be told where to listen).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `portcullis --config <config>` with stdin and stdout closed; the caller
/// adds environment, arguments or a stderr destination.
pub fn binary(config: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Spawns `cmd` and waits until it listens on `addr`; the guard kills it.
pub async fn spawn_listening(mut cmd: Command, addr: SocketAddr) -> ChildGuard {
    let child = cmd.spawn().expect("start the process");
    let mut guard = ChildGuard(Some(child));
    wait_listening(addr, &mut guard).await;
    guard
}

/// Sends `signal` (e.g. `"-TERM"`, `"-HUP"`) to the child with `kill`.
pub fn send_signal(child: &ChildGuard, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} failed");
}

/// `portcullis check --config <config>` with the three secrets the shipped
/// configuration reads from the environment set to usable values.
pub fn check_with_secrets(config: &Path) -> Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .env("PORTCULLIS_BACKEND_KEY", "backend-credential")
        .env("PORTCULLIS_WEB_KEY", "web-key")
        .env(
            "PORTCULLIS_PARAM_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .output()
        .expect("run portcullis check")
}
