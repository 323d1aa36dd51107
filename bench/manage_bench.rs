//! Benchmark of remote operations (run by `bench/manage.sh`): end-to-end
//! latency of `POST /__manage__/true` (a custom command running `/bin/true`,
//! answered inline within `sync_wait`) through the real gateway on loopback.
//!
//! Prints p50/p99 over N sequential runs (one keep-alive connection), runs/s
//! with 4 concurrent operators, and the cost of spawning `/bin/true` alone, so
//! the gateway's own overhead (audit fsyncs, job store commits, HTTP) reads
//! as the difference. Environment: `BENCH_RUNS` (default 1000),
//! `BENCH_DIR` (where the audit log and job store go; default a temp dir).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};

const OPERATORS: usize = 4;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn connect(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn post(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: &str,
) -> Duration {
    let req = http::Request::post("/__manage__/true")
        .header("host", "bench")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let start = Instant::now();
    sender.ready().await.expect("ready");
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let took = start.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"status\":\"succeeded\""), "{text}");
    took
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("bench dir");
    let operators: String = (0..OPERATORS)
        .map(|i| format!("[[operators]]\nname = \"op{i}\"\ntoken = \"token-{i}\"\n"))
        .collect();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
access_log = "off"
[backend]
url = "http://127.0.0.1:9"
[[api_keys]]
name = "app"
key = "device-key"
{operators}
[commands]
state_dir = "{state}"
audit_log = "{audit}"
sync_wait = "10s"
max_concurrent = {OPERATORS}
[[commands.custom]]
name = "true"
argv = ["/bin/true"]
"#,
        state = dir.join("state").display(),
        audit = dir.join("audit.jsonl").display(),
    );
    let config = portcullis::config::Config::parse(&config).unwrap_or_else(|p| panic!("{p}"));
    let state = portcullis::gateway::State::new(config).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(portcullis::server::serve(listener, state, async {
        let _ = stopped.await;
    }));
    // Wait for start (the server opens the audit log and job store first).
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Baseline: /bin/true spawned and waited for directly.
    let mut spawn = Vec::with_capacity(runs);
    for _ in 0..runs.min(300) {
        let start = Instant::now();
        tokio::process::Command::new("/bin/true")
            .status()
            .await
            .expect("/bin/true");
        spawn.push(start.elapsed());
    }
    spawn.sort();

    // Warm-up, then sequential runs on one keep-alive connection.
    let mut sender = connect(addr).await;
    for _ in 0..20 {
        post(&mut sender, "token-0").await;
    }
    let mut lat = Vec::with_capacity(runs);
    for _ in 0..runs {
        lat.push(post(&mut sender, "token-0").await);
    }
    lat.sort();

    // Concurrent operators, each on its own connection.
    let per = runs / OPERATORS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..OPERATORS {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(addr).await;
            let token = format!("token-{i}");
            let mut v = Vec::with_capacity(per);
            for _ in 0..per {
                v.push(post(&mut s, &token).await);
            }
            v
        }));
    }
    let mut conc = Vec::new();
    for t in tasks {
        conc.extend(t.await.expect("operator task"));
    }
    let elapsed = start.elapsed();
    conc.sort();
    let _ = stop.send(());
    let _ = server.await;

    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);
    let spawn50 = percentile(&spawn, 0.50);
    println!("remote operations: POST /__manage__/true (/bin/true), inline result, audit + job store on {}", dir.display());
    println!(
        "  /bin/true alone (spawn+wait):   p50 {:.2} ms  p99 {:.2} ms  ({} runs)",
        ms(spawn50),
        ms(percentile(&spawn, 0.99)),
        spawn.len()
    );
    println!(
        "  sequential, 1 operator:         p50 {:.2} ms  p99 {:.2} ms  ({} runs)",
        ms(p50),
        ms(p99),
        lat.len()
    );
    println!(
        "  gateway overhead at p50:        {:.2} ms (target < 5 ms)",
        ms(p50.saturating_sub(spawn50))
    );
    println!(
        "  {OPERATORS} concurrent operators:          {:.0} runs/s  p50 {:.2} ms  p99 {:.2} ms  ({} runs in {:.2} s)",
        conc.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&conc, 0.50)),
        ms(percentile(&conc, 0.99)),
        conc.len(),
        elapsed.as_secs_f64()
    );
    let lines = std::fs::read_to_string(dir.join("audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    println!("  audit lines written:            {lines}");
}
