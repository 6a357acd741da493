//! Membership by gossip: SWIM failure detection (the `foca` crate, a pure
//! state machine) driven over QUIC datagrams, plus a small broadcast of each
//! node's usage. The result is published as a [`View`] snapshot that placement
//! and the status table read.
//!
//! Memory per node is one entry per member (identity, usage); traffic per node
//! is bounded by SWIM's fixed probe rate and by the packet size, whatever the
//! cluster size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{BroadcastHandler, Codec, Foca, Invalidates, PostcardCodec, Timer};
use shoal_core::{NodeId, NodeInfo, NodeState, View};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::transport::{Datagram, Transport};

/// A member's identity as gossiped: who it is and where it sits. Static for
/// the life of a peer process; `generation` grows with every start so a
/// restarted peer supersedes its previous incarnation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub zone: String,
    pub rack: String,
    pub capacity: u64,
    pub generation: u64,
}

impl foca::Identity for Member {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A node's usage as broadcast: bytes held and whether it is draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    id: NodeId,
    seq: u64,
    used: u64,
    draining: bool,
}

const USAGE_LEN: usize = 16 + 8 + 8 + 1;

impl Usage {
    fn encode(&self) -> [u8; USAGE_LEN] {
        let mut out = [0u8; USAGE_LEN];
        out[..16].copy_from_slice(&self.id.0);
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.used.to_le_bytes());
        out[32] = u8::from(self.draining);
        out
    }

    fn decode(data: &[u8]) -> Result<Self, MalformedUsage> {
        let data: &[u8; USAGE_LEN] = data.try_into().map_err(|_| MalformedUsage)?;
        let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            id: NodeId(data[..16].try_into().expect("16 bytes")),
            seq: u64_at(16),
            used: u64_at(24),
            draining: data[32] != 0,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed usage broadcast")]
struct MalformedUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UsageKey {
    id: NodeId,
    seq: u64,
}

impl Invalidates for UsageKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.id == other.id && self.seq >= other.seq
    }
}

/// Keeps the newest usage per node; newer broadcasts are passed on. Shared
/// with the driver, which reads it when it publishes a view.
#[derive(Debug, Default, Clone)]
struct UsageTable(Arc<Mutex<HashMap<NodeId, Usage>>>);

impl BroadcastHandler<Member> for UsageTable {
    type Key = UsageKey;
    type Error = MalformedUsage;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&Member>,
    ) -> Result<Option<UsageKey>, MalformedUsage> {
        let usage = Usage::decode(data)?;
        let mut table = self.0.lock().expect("usage table");
        let newer = table.get(&usage.id).is_none_or(|old| usage.seq > old.seq);
        if !newer {
            return Ok(None);
        }
        table.insert(usage.id, usage);
        Ok(Some(UsageKey {
            id: usage.id,
            seq: usage.seq,
        }))
    }
}

/// Gossip tuning.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    pub suspect_to_down: Duration,
    /// How often a node re-broadcasts its usage even if unchanged, so that
    /// newcomers learn it.
    pub usage_refresh: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(1000),
            probe_rtt: Duration::from_millis(400),
            suspect_to_down: Duration::from_secs(5),
            usage_refresh: Duration::from_secs(10),
        }
    }
}

impl GossipConfig {
    fn foca(&self) -> foca::Config {
        let mut config = foca::Config::new_lan(NonZeroU32::new(64).expect("non-zero"));
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_to_down;
        // QUIC datagrams on a 1200-byte initial path MTU.
        config.max_packet_size = NonZeroUsize::new(1100).expect("non-zero");
        config
    }
}

enum Command {
    Announce(Member),
    SetDraining(bool),
    Leave(oneshot::Sender<()>),
}

/// Handle on the running gossip driver.
#[derive(Debug, Clone)]
pub struct Gossip {
    view: watch::Receiver<Arc<View>>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Announce(_) => "Announce",
            Command::SetDraining(_) => "SetDraining",
            Command::Leave(_) => "Leave",
        })
    }
}

impl Gossip {
    /// Starts the driver for `me`. `used` reports this node's bytes held.
    pub fn start(
        me: Member,
        config: GossipConfig,
        transport: Arc<Transport>,
        datagrams: mpsc::Receiver<Datagram>,
        used: impl Fn() -> u64 + Send + 'static,
    ) -> Self {
        let (view_tx, view) = watch::channel(Arc::new(View::default()));
        let (commands, command_rx) = mpsc::channel(16);
        let driver = Driver::new(me, config, transport, view_tx, Box::new(used));
        tokio::spawn(driver.run(datagrams, command_rx));
        Self { view, commands }
    }

    /// The current membership snapshot.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that changes whenever the view does.
    pub fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// Asks the node with `id` at `addr` to let us in.
    pub async fn announce(&self, id: NodeId, addr: SocketAddr) {
        let placeholder = Member {
            id,
            addr,
            zone: String::new(),
            rack: String::new(),
            capacity: 0,
            generation: 0,
        };
        let _ = self.commands.send(Command::Announce(placeholder)).await;
    }

    pub async fn set_draining(&self, draining: bool) {
        let _ = self.commands.send(Command::SetDraining(draining)).await;
    }

    /// Tells the cluster we are leaving, so it need not wait for the failure
    /// detector.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

struct Driver {
    foca: Foca<Member, PostcardCodec, rand::rngs::StdRng, UsageTable>,
    usages: UsageTable,
    runtime: foca::AccumulatingRuntime<Member>,
    me: Member,
    config: GossipConfig,
    transport: Arc<Transport>,
    view_tx: watch::Sender<Arc<View>>,
    used: Box<dyn Fn() -> u64 + Send>,
    usage: Usage,
    timers: mpsc::Sender<Timer<Member>>,
    timer_rx: Option<mpsc::Receiver<Timer<Member>>>,
}

impl Driver {
    fn new(
        me: Member,
        config: GossipConfig,
        transport: Arc<Transport>,
        view_tx: watch::Sender<Arc<View>>,
        used: Box<dyn Fn() -> u64 + Send>,
    ) -> Self {
        let usages = UsageTable::default();
        let foca = Foca::with_custom_broadcast(
            me.clone(),
            config.foca(),
            rand::make_rng(),
            PostcardCodec,
            usages.clone(),
        );
        let (timers, timer_rx) = mpsc::channel(1024);
        let usage = Usage {
            id: me.id,
            seq: me.generation << 20,
            used: 0,
            draining: false,
        };
        Self {
            foca,
            usages,
            runtime: foca::AccumulatingRuntime::new(),
            me,
            config,
            transport,
            view_tx,
            used,
            usage,
            timers,
            timer_rx: Some(timer_rx),
        }
    }

    async fn run(
        mut self,
        mut datagrams: mpsc::Receiver<Datagram>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut timer_rx = self.timer_rx.take().expect("timer receiver");
        let mut publish = tokio::time::interval(Duration::from_millis(200));
        let mut refresh = tokio::time::interval(self.config.usage_refresh);
        let mut usage_check = tokio::time::interval(Duration::from_secs(1));
        self.broadcast_usage();
        self.publish();
        loop {
            let result = tokio::select! {
                Some((from, data)) = datagrams.recv() => self.receive(from, &data),
                Some(timer) = timer_rx.recv() => self.foca.handle_timer(timer, &mut self.runtime),
                command = commands.recv() => match command {
                    Some(Command::Announce(dst)) => self.foca.announce(dst, &mut self.runtime),
                    Some(Command::SetDraining(draining)) => {
                        self.usage.draining = draining;
                        self.broadcast_usage();
                        Ok(())
                    }
                    Some(Command::Leave(done)) => {
                        let result = self.foca.leave_cluster(&mut self.runtime);
                        self.flush().await;
                        let _ = done.send(());
                        if let Err(e) = result {
                            debug!("leaving: {e}");
                        }
                        return;
                    }
                    None => return,
                },
                _ = usage_check.tick() => {
                    // Re-broadcast when usage moved by 1% of capacity.
                    let used = (self.used)();
                    if used.abs_diff(self.usage.used) > self.me.capacity / 100 {
                        self.broadcast_usage();
                    }
                    Ok(())
                }
                _ = refresh.tick() => { self.broadcast_usage(); Ok(()) }
                _ = publish.tick() => { self.publish(); Ok(()) }
            };
            if let Err(e) = result {
                debug!("gossip: {e}");
            }
            self.drain();
        }
    }

    /// Accepts a datagram only if its sender is the node that the TLS
    /// handshake authenticated: no peer can speak for another.
    fn receive(&mut self, from: NodeId, data: &[u8]) -> Result<(), foca::Error> {
        match Codec::<Member>::decode_header(&mut PostcardCodec, data) {
            Ok(header) if header.src.id == from => self.foca.handle_data(data, &mut self.runtime),
            Ok(header) => {
                warn!(claimed = %header.src.id, authenticated = %from, "dropping spoofed gossip");
                Ok(())
            }
            Err(e) => {
                debug!(%from, "malformed gossip: {e}");
                Ok(())
            }
        }
    }

    fn broadcast_usage(&mut self) {
        self.usage.seq += 1;
        self.usage.used = (self.used)();
        if let Err(e) = self.foca.add_broadcast(&self.usage.encode()) {
            debug!("usage broadcast: {e}");
        }
    }

    /// Carries out what foca asked for: datagrams, timers, notifications.
    fn drain(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            let transport = self.transport.clone();
            tokio::spawn(async move {
                if let Err(e) = transport.send_datagram(to.addr, data).await {
                    debug!("gossip to {}: {e}", to.id);
                }
            });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let timers = self.timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = timers.send(timer).await;
            });
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                foca::OwnedNotification::MemberUp(m) => {
                    info!(node = %m.id, addr = %m.addr, zone = %m.zone, rack = %m.rack, "member up")
                }
                foca::OwnedNotification::MemberDown(m) => info!(node = %m.id, "member down"),
                foca::OwnedNotification::Defunct => {
                    // Declared dead while alive (a partition healed): rejoin
                    // with a newer generation.
                    warn!("declared down by the cluster; rejoining");
                    let renewed = foca::Identity::renew(&self.me).expect("renewable");
                    self.me = renewed.clone();
                    if let Err(e) = self.foca.change_identity(renewed, &mut self.runtime) {
                        warn!("rejoining: {e}");
                    }
                }
                other => debug!("gossip: {other:?}"),
            }
        }
    }

    /// Sends what is queued before a shutdown.
    async fn flush(&mut self) {
        let mut sends = Vec::new();
        while let Some((to, data)) = self.runtime.to_send() {
            let transport = self.transport.clone();
            sends.push(async move { transport.send_datagram(to.addr, data).await });
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(1), futures::future::join_all(sends)).await;
    }

    fn publish(&mut self) {
        let usages = self.usages.0.lock().expect("usage table").clone();
        let info = |m: &Member, state: NodeState| {
            let usage = usages.get(&m.id);
            NodeInfo {
                id: m.id,
                addr: m.addr,
                zone: m.zone.clone(),
                rack: m.rack.clone(),
                capacity: m.capacity,
                used: usage.map_or(0, |u| u.used),
                state: match usage {
                    Some(u) if u.draining && state == NodeState::Alive => NodeState::Draining,
                    _ => state,
                },
            }
        };
        let mut nodes: Vec<NodeInfo> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().id != self.me.id)
            .map(|m| {
                let state = match m.state() {
                    foca::State::Alive => NodeState::Alive,
                    foca::State::Suspect => NodeState::Suspect,
                    foca::State::Down => NodeState::Dead,
                };
                info(m.id(), state)
            })
            .collect();
        let mut me = info(&self.me, NodeState::Alive);
        me.used = (self.used)();
        if self.usage.draining {
            me.state = NodeState::Draining;
        }
        nodes.push(me);
        let view = View::new(nodes);
        self.view_tx.send_if_modified(|current| {
            if current.nodes() == view.nodes() {
                false
            } else {
                *current = Arc::new(view);
                true
            }
        });
    }
}
