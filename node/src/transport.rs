//! The QUIC transport between peers: mutual TLS on every connection, one
//! request per bidirectional stream (many streams share a connection, so
//! callers pipeline freely), and unreliable datagrams for gossip.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use rustls_pki_types::CertificateDer;
use shoal_core::NodeId;
use shoal_proto::peer::{PeerRequest, PeerResponse};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::identity::{self, NodeIdentity};

/// The largest request or response a stream may carry: a batch of blocks.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Bound on cached outgoing connections; closed ones are swept past it.
const MAX_CACHED_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("request to {addr} failed: {reason}")]
    Stream { addr: SocketAddr, reason: String },
    #[error("malformed message from {addr}: {reason}")]
    Decode { addr: SocketAddr, reason: String },
}

/// Timeouts the transport applies.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(20),
        }
    }
}

/// Serves requests that arrive from other peers.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        from: NodeId,
        request: PeerRequest,
    ) -> impl Future<Output = PeerResponse> + Send;
}

/// A gossip datagram and the authenticated node that sent it.
pub type Datagram = (NodeId, Bytes);

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// This peer's QUIC endpoint and its cache of outgoing connections.
#[derive(Debug)]
pub struct Transport {
    endpoint: Endpoint,
    connections: Mutex<HashMap<SocketAddr, Slot>>,
    timeouts: Timeouts,
    /// Fault injection: peers we behave as if cut off from.
    unreachable: Mutex<HashSet<SocketAddr>>,
}

/// The largest UDP payload MTU discovery probes for: loopback's 64 KiB MTU
/// less the IP and UDP headers, with room to spare.
const MAX_UDP_PAYLOAD: u16 = 65_000;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
    t.datagram_receive_buffer_size(Some(1 << 20));
    // Probe up to what loopback carries (peers sharing a machine) and past
    // jumbo frames (storage networks often have them): a 1 MiB block then
    // takes a sixth of the packets, or a fortieth. Paths that carry less
    // stop at what they carry.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

impl Transport {
    /// Binds a QUIC endpoint on `listen` that both serves and connects with
    /// this peer's certificate.
    pub fn bind(
        identity: &NodeIdentity,
        listen: SocketAddr,
        timeouts: Timeouts,
    ) -> anyhow::Result<Arc<Self>> {
        let server_crypto = QuicServerConfig::try_from(identity.server_config()?)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config());
        let endpoint = Endpoint::server(server, listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        Ok(Arc::new(Self::with_endpoint(endpoint, identity, timeouts)?))
    }

    /// A transport that only connects (for clients that serve nothing).
    pub fn client(identity: &NodeIdentity, timeouts: Timeouts) -> anyhow::Result<Arc<Self>> {
        let endpoint = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        Ok(Arc::new(Self::with_endpoint(endpoint, identity, timeouts)?))
    }

    fn with_endpoint(
        mut endpoint: Endpoint,
        identity: &NodeIdentity,
        timeouts: Timeouts,
    ) -> anyhow::Result<Self> {
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(
            identity.client_config()?,
        )?));
        client.transport_config(transport_config());
        endpoint.set_default_client_config(client);
        Ok(Self {
            endpoint,
            connections: Mutex::new(HashMap::new()),
            timeouts,
            unreachable: Mutex::new(HashSet::new()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Fault injection: from now on, act as if partitioned from `peers`.
    pub fn set_unreachable(&self, peers: HashSet<SocketAddr>) {
        *self.unreachable.lock().expect("unreachable set") = peers;
    }

    fn is_unreachable(&self, addr: &SocketAddr) -> bool {
        self.unreachable
            .lock()
            .expect("unreachable set")
            .contains(addr)
    }

    /// An open connection to `addr`, reusing a cached one when it is alive.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let slot = {
            let mut map = self.connections.lock().expect("connection map");
            if map.len() > MAX_CACHED_CONNECTIONS {
                map.retain(|_, slot| {
                    slot.try_lock()
                        .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
                        .unwrap_or(true)
                });
            }
            map.entry(addr).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        let connect_err = |reason: String| TransportError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect(addr, identity::PEER_SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(self.timeouts.connect, connecting)
            .await
            .map_err(|_| connect_err(format!("timed out after {:?}", self.timeouts.connect)))?
            .map_err(|e| connect_err(e.to_string()))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one request to the peer at `addr` and waits for its response.
    pub async fn request(
        &self,
        addr: SocketAddr,
        request: &PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        let after = self.timeouts.request;
        if self.is_unreachable(&addr) {
            // As a partition does: no answer, until the caller gives up.
            tokio::time::sleep(after).await;
            return Err(TransportError::Timeout { addr, after });
        }
        tokio::time::timeout(after, async {
            let conn = self.connection(addr).await?;
            let stream_err = |reason: String| TransportError::Stream { addr, reason };
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            send.write_chunk(Bytes::from(request.encode_to_vec()))
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            send.finish().map_err(|e| stream_err(e.to_string()))?;
            let bytes = recv
                .read_to_end(MAX_MESSAGE)
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            PeerResponse::decode(Bytes::from(bytes)).map_err(|e| TransportError::Decode {
                addr,
                reason: e.to_string(),
            })
        })
        .await
        .map_err(|_| TransportError::Timeout { addr, after })?
    }

    /// Sends a gossip datagram; delivery is not guaranteed (nor needed).
    pub async fn send_datagram(&self, addr: SocketAddr, data: Bytes) -> Result<(), TransportError> {
        if self.is_unreachable(&addr) {
            return Ok(());
        }
        let conn = self.connection(addr).await?;
        conn.send_datagram(data)
            .map_err(|e| TransportError::Stream {
                addr,
                reason: e.to_string(),
            })
    }

    /// Accepts connections until the endpoint closes: requests go to
    /// `handler`, datagrams to `datagrams`.
    pub async fn serve<H: Handler>(&self, handler: Arc<H>, datagrams: mpsc::Sender<Datagram>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let handler = handler.clone();
            let datagrams = datagrams.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => serve_connection(conn, handler, datagrams).await,
                    // A peer from another cluster ends here: its certificate
                    // does not chain to our CA.
                    Err(e) => warn!(%remote, "refused connection: {e}"),
                }
            });
        }
    }

    /// Closes every connection and the endpoint.
    pub async fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The node id bound to the certificate the remote presented.
pub fn remote_node_id(conn: &Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    identity::node_id_of(certs.first()?).ok()
}

async fn serve_connection<H: Handler>(
    conn: Connection,
    handler: Arc<H>,
    datagrams: mpsc::Sender<Datagram>,
) {
    let Some(from) = remote_node_id(&conn) else {
        conn.close(VarInt::from_u32(1), b"no certificate");
        return;
    };
    let gossip = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Ok(data) = conn.read_datagram().await {
                if datagrams.send((from, data)).await.is_err() {
                    break;
                }
            }
        })
    };
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let request = match recv.read_to_end(MAX_MESSAGE).await {
                Ok(bytes) => bytes,
                Err(e) => return debug!("request stream from {from}: {e}"),
            };
            let response = match PeerRequest::decode(Bytes::from(request)) {
                Ok(request) => handler.handle(from, request).await,
                Err(e) => crate::blocks::error_response(
                    shoal_proto::peer::ErrorCode::Invalid,
                    format!("malformed request: {e}"),
                ),
            };
            if send
                .write_chunk(Bytes::from(response.encode_to_vec()))
                .await
                .is_ok()
            {
                let _ = send.finish();
                // Let the peer read the whole response before the stream goes.
                let _ = send.stopped().await;
            }
        });
    }
    gossip.abort();
}
