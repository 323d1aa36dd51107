//! Slow attacks: 500 slowloris connections dribbling header bytes, and slow
//! request bodies, while a normal client keeps asking. The normal client's
//! p99 is printed (run with `--nocapture`) and must stay under a second.

use crate::support::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Attackers stop and are aborted when this is dropped (also on panic).
struct Attack {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Connections the gateway closed on an attacker.
    dropped: Arc<AtomicUsize>,
    /// Connections opened by attackers.
    opened: Arc<AtomicUsize>,
}

impl Attack {
    fn new() -> Attack {
        Attack {
            stop: watch::channel(false).0,
            tasks: JoinSet::new(),
            dropped: Arc::new(AtomicUsize::new(0)),
            opened: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// One attacker: opens a connection, writes `prefix`, then one byte of
    /// `drip` every `every` (cycling); reconnects when the gateway drops it.
    fn spawn(&mut self, addr: SocketAddr, prefix: Vec<u8>, drip: &'static [u8], every: Duration) {
        let mut stop = self.stop.subscribe();
        let dropped = Arc::clone(&self.dropped);
        let opened = Arc::clone(&self.opened);
        // Spread the drips over the period.
        let offset = every.mul_f64(fastrand::f64());
        self.tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            'reconnect: while !*stop.borrow() {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                if s.write_all(&prefix).await.is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut i = 0;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break 'reconnect,
                        _ = tokio::time::sleep(every) => {}
                    }
                    // A write after the peer closed fails (at the latest on the second try).
                    if s.write_all(&drip[i % drip.len()..][..1]).await.is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue 'reconnect;
                    }
                    i += 1;
                }
            }
        });
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
    }
}

/// Skips (returns false) with a message when this process cannot open
/// enough sockets for `needed` connections (both ends are in-process).
fn enough_files(needed: u64) -> bool {
    // The three tests here may run at once: ask for room for all of them.
    raise_open_files(8192);
    let limit = open_files_limit();
    if limit < needed {
        eprintln!("SKIPPED: ulimit -n is {limit}, below the {needed} this test needs; raise it (ulimit -n 4096) to run it");
        return false;
    }
    true
}

/// Sequential requests on fresh connections for `run`; returns latencies.
async fn normal_client(gw: &Gateway, path: &str, run: Duration) -> (Vec<Duration>, usize) {
    let mut lat = Vec::new();
    let mut failures = 0;
    let until = Instant::now() + run;
    while Instant::now() < until {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), gw.get(path).send()).await;
        match r {
            Ok(r) if r.status == 200 => lat.push(t.elapsed()),
            Ok(r) => {
                eprintln!("normal client got {}: {}", r.status, r.text());
                failures += 1;
                lat.push(t.elapsed());
            }
            Err(_) => {
                failures += 1;
                lat.push(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (lat, failures)
}

fn report(what: &str, lat: &mut [Duration], failures: usize) -> Duration {
    let n = lat.len();
    let p50 = quantile(lat, 0.5);
    let p99 = quantile(lat, 0.99);
    let max = lat.iter().max().copied().unwrap_or_default();
    eprintln!("{what}: normal client {n} requests, {failures} failed, p50 {p50:?}, p99 {p99:?}, max {max:?}");
    p99
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_500_connections_do_not_stop_a_normal_client() {
    watch_panics();
    if !enough_files(1200) {
        return;
    }
    let backend = Backend::start().await;
    let gw = GatewayConfig::new(backend.url())
        .limits("header_read_timeout = \"2s\"")
        .start()
        .await;

    // Baseline without attack.
    let (mut base, _) = normal_client(&gw, "/api/status", Duration::from_secs(1)).await;
    report("baseline", &mut base, 0);

    let mut attack = Attack::new();
    let prefix =
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n").into_bytes();
    for _ in 0..500 {
        attack.spawn(
            gw.addr,
            prefix.clone(),
            b"X-Slow: aaaaaaaaaa\r\n",
            Duration::from_secs(1),
        );
    }
    // Let the attackers connect.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open_under_attack = gw.state.metrics().open_connections.get();
    let (mut lat, failures) = normal_client(&gw, "/api/status", Duration::from_secs(8)).await;
    let dropped = attack.dropped.load(Ordering::Relaxed);
    let opened = attack.opened.load(Ordering::Relaxed);
    drop(attack);
    let p99 = report("slowloris x500", &mut lat, failures);
    eprintln!("attackers: {opened} connections opened, {dropped} dropped by the gateway; {open_under_attack} open at the start of the measurement");
    assert!(opened >= 500, "all attackers connected: {opened}");
    assert!(
        dropped >= 400,
        "the header deadline drops slowloris connections: {dropped}"
    );
    assert_eq!(failures, 0, "every normal request answered 200");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    gw.stop().await;
    assert_no_panics();
}

/// `attackers` connections each declaring a `content_length`-byte body to
/// `/api/echo` and sending a byte a second, against a gateway with a 2 s body
/// deadline and a 32-connection backend pool; a normal client measures for
/// `measure`. Returns the gateway, the normal client's p99 and failures, and
/// the attackers opened and dropped.
async fn slow_body_attack(
    backend: &Backend,
    content_length: usize,
    attackers: usize,
    measure: Duration,
    label: &str,
) -> (Gateway, Duration, usize, usize, usize) {
    let gw = GatewayConfig::new(backend.url())
        .limits("body_read_timeout = \"2s\"")
        .backend("max_connections = 32")
        .backend("timeout = \"3s\"")
        .start()
        .await;
    let mut attack = Attack::new();
    let prefix = format!(
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\nContent-Length: {content_length}\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..attackers {
        attack.spawn(gw.addr, prefix.clone(), b"a", Duration::from_secs(1));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut lat, failures) = normal_client(&gw, "/api/status", measure).await;
    let dropped = attack.dropped.load(Ordering::Relaxed);
    let opened = attack.opened.load(Ordering::Relaxed);
    drop(attack);
    let p99 = report(label, &mut lat, failures);
    (gw, p99, failures, opened, dropped)
}

/// Slow request bodies (a byte a second, never finishing), API-sized
/// (under the 64 KiB buffering threshold): buffered before any backend
/// connection is taken, so even with more attackers than the backend pool
/// has connections the normal client keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_small_bodies_do_not_starve_the_backend_pool() {
    watch_panics();
    if !enough_files(1200) {
        return;
    }
    let backend = Backend::start().await;
    let (gw, p99, failures, opened, dropped) = slow_body_attack(
        &backend,
        20_000,
        200,
        Duration::from_secs(8),
        "slow 20 KB bodies x200 (backend pool 32)",
    )
    .await;
    eprintln!("attackers: {opened} connections opened, {dropped} dropped by the gateway");
    assert!(
        dropped >= 200,
        "slow bodies are cut by limits.body_read_timeout: {dropped}"
    );
    assert_eq!(failures, 0, "every normal request answered 200");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(
        backend.requests_to("/echo").is_empty(),
        "no incomplete body was forwarded"
    );
    gw.stop().await;
    assert_no_panics();
}

/// Slow *large* bodies (over the buffering threshold) are streamed, so each
/// holds a backend connection until the route deadline cuts it; streamed
/// uploads may use only half the backend pool, so with more attackers than
/// the pool has connections the normal client is still served at once, and
/// every attacker is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_large_bodies_are_cut_and_the_gateway_recovers() {
    watch_panics();
    if !enough_files(1200) {
        return;
    }
    let backend = Backend::start().await;
    let (gw, p99, failures, _, dropped) = slow_body_attack(
        &backend,
        500_000,
        100,
        Duration::from_secs(6),
        "slow 500 KB bodies x100 (backend pool 32)",
    )
    .await;
    assert!(
        dropped >= 100,
        "slow bodies are cut by the route deadline: {dropped}"
    );
    assert_eq!(failures, 0, "every normal request answered 200");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    for r in backend.requests_to("/echo") {
        assert!(r.body_error, "a cut body never arrives as complete");
    }
    // Once the attack stops, service is normal again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = Instant::now();
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1));
    gw.stop().await;
    assert_no_panics();
}

/// Devices that ask for a large answer and then stop reading are
/// disconnected after `limits.send_timeout`, which frees the backend
/// connections their answers held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_are_disconnected_and_free_the_backend_pool() {
    watch_panics();
    let backend = Backend::start().await;
    backend.on("/download", Reply::pattern(64 << 20));
    let gw = GatewayConfig::new(backend.url())
        .limits("send_timeout = \"1s\"")
        .backend("max_connections = 2")
        .route(DOWNLOAD_ROUTE)
        .start()
        .await;
    // Two readers that never read take both backend connections.
    let request = format!("GET /api/download HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n");
    let mut readers = Vec::new();
    for _ in 0..2 {
        use tokio::io::AsyncReadExt;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        // The answer has started (so this reader holds a backend connection).
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        readers.push(s);
    }
    let started = Instant::now();
    // While they hold the pool, a normal request waits; once the send
    // deadline disconnects them it is answered.
    let r = gw.get("/api/status").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(8), "answered after {waited:?}");
    // A reader whose answer started late (after the normal request) stalls
    // too; give it its send deadline before reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The stalled readers' connections were closed by the gateway: after
    // draining what the kernel buffered, each read ends.
    for mut s in readers {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
        eprintln!("reader: {total} bytes, closed: {}", closed.is_ok());
        assert!(closed.is_ok(), "connection closed by the gateway");
        assert!(total < 64 << 20, "the whole answer was not sent: {total}");
    }
    gw.stop().await;
    assert_no_panics();
}

/// A large answer within `limits.response_buffer` is read ahead of a device
/// that reads slowly, so its backend connection is free for others at once
/// and the device still gets every byte. With read-ahead off (the control),
/// the same device holds the only backend connection and the next request
/// times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_read_ahead_free_the_backend_from_slow_readers() {
    use tokio::io::AsyncReadExt;
    watch_panics();
    const LEN: u64 = 16 << 20;
    let backend = Backend::start().await;
    backend.on("/download", Reply::pattern(LEN));
    for (buffer, read_ahead) in [("\"32MiB\"", true), ("0", false)] {
        let gw = GatewayConfig::new(backend.url())
            .limits("send_timeout = \"60s\"")
            .limits(&format!("response_buffer = {buffer}"))
            .backend("max_connections = 1")
            .backend("timeout = \"2s\"")
            .route(DOWNLOAD_ROUTE)
            .start()
            .await;
        // A device that reads the status line, then nothing for a while.
        let mut slow = TcpStream::connect(gw.addr).await.unwrap();
        let request =
            format!("GET /api/download HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n\r\n");
        slow.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        slow.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");

        let started = Instant::now();
        let r = gw.get("/api/status").send().await;
        let waited = started.elapsed();
        if read_ahead {
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(waited < Duration::from_secs(1), "answered after {waited:?}");
            assert!(r.text().is_empty() || r.status == 200);
        } else {
            assert_eq!(r.status, 504, "{}", r.text());
            assert!(waited >= Duration::from_millis(1900), "{waited:?}");
        }

        // The slow device still gets the whole answer, byte for byte.
        let mut got = head;
        let complete = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = slow.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return false;
                }
                got.extend_from_slice(&buf[..n]);
                if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    if (got.len() - end - 4) as u64 >= LEN {
                        return true;
                    }
                }
            }
        })
        .await;
        if read_ahead {
            assert_eq!(complete, Ok(true), "{} bytes", got.len());
            let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let body = &got[end..];
            assert_eq!(body.len() as u64, LEN);
            assert!(body
                .iter()
                .enumerate()
                .all(|(i, &b)| b == pattern_byte(i as u64)));
        }
        gw.stop().await;
    }
    assert_no_panics();
}
