//! The admin listener (`server.admin_listen`): `/metrics`, `/healthz`,
//! `/readyz`. Never on the device listener.

use super::live::Live;
use crate::body::Body;
use crate::envelope::{self, GatewayError};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Serves the admin endpoints until `shutdown`: `/metrics` (Prometheus),
/// `/healthz` (the process is up), `/readyz` (a configuration is loaded and
/// the backend accepts connections). Bind it to a private address.
pub async fn serve_admin(
    listener: TcpListener,
    live: Arc<Live>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let live = Arc::clone(&live);
                async move { Ok::<_, Infallible>(admin(&live, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn admin(live: &Live, req: Request<Incoming>) -> Response<Body> {
    let state = live.state();
    let text = |status: http::StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Body::full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != http::Method::GET {
        return envelope::gateway_error(
            &GatewayError::MethodNotAllowed(vec![http::Method::GET]),
            &state.config.server.error_type,
            "-",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let metrics = state.metrics();
            metrics
                .session_entries
                .set(i64::try_from(state.sessions().entry_count().await).unwrap_or(i64::MAX));
            metrics
                .response_buffer_bytes
                .set(i64::try_from(state.read_ahead_bytes()).unwrap_or(i64::MAX));
            text(
                http::StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        "/healthz" => text(
            http::StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.into(),
        ),
        "/readyz" => {
            let address = &state.config.backend.address;
            let reachable = tokio::time::timeout(
                state.config.backend.connect_timeout,
                TcpStream::connect(address.as_str()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if reachable {
                text(
                    http::StatusCode::OK,
                    "application/json",
                    r#"{"status":"ready"}"#.into(),
                )
            } else {
                envelope::response(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    &state.config.server.error_type,
                    "Backend not reachable",
                    "-",
                )
            }
        }
        _ => envelope::gateway_error(
            &GatewayError::NotFound,
            &state.config.server.error_type,
            "-",
        ),
    }
}
