//! A bare HTTP/1.1 forwarder on hyper: the floor under portcullis's request
//! path, measured by `bench/run.sh` as the `bare` target.
//!
//! It does only what every proxy on hyper must: one worker thread, each
//! device connection served by hyper's HTTP/1.1 server with its own backend
//! connection (hyper's connection-level client, driven by a task of its own),
//! the request's URI made origin-form, the answer streamed back. No API key,
//! no session, no header rewriting, no limits, no metrics: not a gateway.
//!
//! Usage: `bare_forwarder LISTEN_ADDR BACKEND_ADDR` (both `host:port`).

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_forwarder LISTEN_ADDR BACKEND_ADDR");
        return ExitCode::from(64);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, serve(listen, Rc::from(backend))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_forwarder: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: String, backend: Rc<str>) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (device, _) = listener.accept().await?;
        let backend = Rc::clone(&backend);
        tokio::task::spawn_local(async move {
            if let Err(e) = connection(device, &backend).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

/// Serves one device connection over one backend connection of its own.
async fn connection(device: TcpStream, backend: &str) -> Result<(), Box<dyn std::error::Error>> {
    device.set_nodelay(true)?;
    let upstream = TcpStream::connect(backend).await?;
    upstream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream)).await?;
    tokio::task::spawn_local(conn);
    let sender = Rc::new(RefCell::new(sender));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let mut origin = http::uri::Parts::default();
        origin.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(uri) = http::Uri::from_parts(origin) {
            *req.uri_mut() = uri;
        }
        // The future does not borrow the sender: no borrow is held across
        // the await.
        let answer = sender.borrow_mut().send_request(req);
        async move {
            let resp: Result<Response<Incoming>, hyper::Error> = answer.await;
            resp
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(device), service)
        .await?;
    Ok(())
}
