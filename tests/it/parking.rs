//! Idle HTTP/1.1 connections are parked (hyper's connection dropped, only the
//! socket kept) and woken by the device's next byte. What the device sees does
//! not change: the next request is served, bytes it pipelined are not lost,
//! the idle and header deadlines and the drain still close it, request ids go
//! on. `portcullis_parked_connections` shows the park.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway in front of `backend` with the `[limits]` lines given. With
/// `idle_timeout` of 2 s or more, a connection is parked 1 s after an answer.
async fn gateway(backend: &Backend, limits: &[&str]) -> Gateway {
    let mut cfg = GatewayConfig::new(backend.url());
    for line in limits {
        cfg = cfg.limits(line);
    }
    cfg.start().await
}

fn status_request(extra_headers: &str) -> String {
    format!("GET /api/status HTTP/1.1\r\nHost: x\r\nApi-Key: {IOS_KEY}\r\n{extra_headers}\r\n")
}

/// Waits (at most 5 s) until the gateway reports `n` parked connections.
async fn wait_parked(gw: &Gateway, n: i64) {
    let started = Instant::now();
    loop {
        let parked = gw.state.metrics().parked_connections.get();
        if parked == n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{parked} connections parked, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request_id(resp: &Resp) -> String {
    resp.header("x-request-id")
        .expect("every answer carries x-request-id")
        .to_owned()
}

#[tokio::test]
async fn a_parked_connection_serves_the_next_requests_with_new_request_ids() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, &["idle_timeout = \"3s\""]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(status_request("").as_bytes()).await.unwrap();
    let first = read_raw_response(&mut s).await;
    assert_eq!(first.status, 200, "{}", first.text());
    wait_parked(&gw, 1).await;
    assert_eq!(gw.state.metrics().open_connections.get(), 1);

    // Woken by the next request on the same socket.
    s.write_all(status_request("").as_bytes()).await.unwrap();
    let second = read_raw_response(&mut s).await;
    assert_eq!(second.status, 200, "{}", second.text());
    let (id1, id2) = (request_id(&first), request_id(&second));
    assert_eq!(id2.len(), 26);
    assert!(id2 > id1, "ids stay time-ordered: {id1} then {id2}");
    // A device's own request id is still echoed after a park.
    wait_parked(&gw, 1).await;
    s.write_all(status_request("X-Request-Id: device-chosen-7\r\n").as_bytes())
        .await
        .unwrap();
    let third = read_raw_response(&mut s).await;
    assert_eq!(third.status, 200, "{}", third.text());
    assert_eq!(request_id(&third), "device-chosen-7");
    assert_eq!(gw.state.metrics().parked_connections.get(), 0);
    assert_eq!(backend.count("/status"), 3);
}

#[tokio::test]
async fn a_pipelined_head_read_ahead_survives_the_park() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, &["idle_timeout = \"3s\""]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    // The first request and the start of a second in one write: hyper reads
    // both, answers the first and holds the rest when it is parked.
    let second = status_request("X-Request-Id: pipelined-second\r\n");
    let (start, rest) = second.split_at(second.len() - 10);
    let mut bytes = status_request("");
    bytes.push_str(start);
    s.write_all(bytes.as_bytes()).await.unwrap();
    let first = read_raw_response(&mut s).await;
    assert_eq!(first.status, 200, "{}", first.text());
    wait_parked(&gw, 1).await;

    s.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_raw_response(&mut s).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(request_id(&answer), "pipelined-second");
    assert_eq!(backend.count("/status"), 2);
}

#[tokio::test]
async fn the_idle_timeout_closes_a_parked_connection() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, &["idle_timeout = \"2s\""]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(status_request("").as_bytes()).await.unwrap();
    assert_eq!(read_raw_response(&mut s).await.status, 200);
    let answered = Instant::now();
    wait_parked(&gw, 1).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf))
        .await
        .expect("the gateway closes the parked connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    let took = answered.elapsed();
    assert!(took >= Duration::from_millis(1800), "closed after {took:?}");
    wait_parked(&gw, 0).await;
    assert_eq!(gw.state.metrics().open_connections.get(), 0);
}

#[tokio::test]
async fn the_header_deadline_runs_from_the_first_byte_after_a_wake_up() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        &["idle_timeout = \"3s\"", "header_read_timeout = \"500ms\""],
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(status_request("").as_bytes()).await.unwrap();
    assert_eq!(read_raw_response(&mut s).await.status, 200);
    wait_parked(&gw, 1).await;
    // Half a head wakes the connection; the rest never comes.
    assert_half_head_gets_408(&mut s).await;
}

#[tokio::test]
async fn the_drain_closes_a_parked_connection() {
    let backend = Backend::start().await;
    let mut gw = gateway(&backend, &["idle_timeout = \"30s\""]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(status_request("").as_bytes()).await.unwrap();
    assert_eq!(read_raw_response(&mut s).await.status, 200);
    wait_parked(&gw, 1).await;
    gw.trigger_shutdown();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the drain closes the parked connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    gw.join().await.unwrap();
}
