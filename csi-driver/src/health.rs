//! The liveness endpoint kubelet probes when no livenessprobe sidecar
//! runs: `GET /healthz` answers 200 while this process serves. It does not
//! ask the peer: a CSI node service restarted because its peer is away
//! would drop the FUSE connections it keeps for that peer.

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

/// Serves `/healthz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /healthz");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| async move {
                let (status, body) = if request.uri().path() == "/healthz" {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::NOT_FOUND, "not found\n")
                };
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!("healthz connection: {e}");
            }
        });
    }
}
