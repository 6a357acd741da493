//! gRPC over unix sockets: how the `shoal` CLI and `shoal-csi` reach a
//! peer's admin API, and how Kubernetes reaches `shoal-csi`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to the gRPC server listening on the socket at `path`. It
/// connects on first use and reconnects after the server restarts.
pub fn channel(path: impl AsRef<Path>) -> Channel {
    let path: PathBuf = path.as_ref().to_path_buf();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        },
    ))
}

/// Listens on a unix socket at `path`, replacing a socket file a previous
/// server left behind (the caller makes sure none is running).
pub fn listen(path: impl AsRef<Path>) -> std::io::Result<UnixListenerStream> {
    let path = path.as_ref();
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(UnixListenerStream::new(UnixListener::bind(path)?))
}
