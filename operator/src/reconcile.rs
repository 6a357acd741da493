//! The StorageCluster controller: applies what [`crate::objects`] says a
//! StorageCluster becomes (server-side apply, one field manager), makes
//! its CA Secret once, reports status from the peers' DaemonSet and the
//! controller Deployment, and on deletion removes the cluster-scoped
//! objects that owner references cannot reach (a finalizer).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{StorageCluster, StorageClusterStatus};
use crate::objects::{self, CLUSTER_LABEL, Desired, Names};
use crate::peers;

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "shoal-operator";
const FINALIZER: &str = "shoal.io/cleanup";
/// How often a settled cluster's status is refreshed.
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("StorageCluster {0} has no namespace")]
    NoNamespace(String),
    #[error("cannot make the cluster CA: {0}")]
    Ca(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("erasing the peers' data: {0} of {1} nodes done")]
    Wiping(i32, i32),
}

/// What every reconciliation shares.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(client: Client) -> anyhow::Result<()> {
    let clusters: Api<StorageCluster> = Api::all(client.clone());
    if let Err(e) = clusters.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list StorageClusters ({e}); is the CRD installed? `shoal-operator crd | kubectl apply -f -`"
        );
    }
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
    });
    let wc = watcher::Config::default();
    Controller::new(clusters, wc.clone())
        .owns(Api::<DaemonSet>::all(client.clone()), wc.clone())
        .owns(Api::<Deployment>::all(client.clone()), wc.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), wc.clone())
        .owns(Api::<Service>::all(client.clone()), wc)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => info!(%object, "reconciled"),
                Err(e) => warn!("reconcile failed: {e}"),
            }
        })
        .await;
    Ok(())
}

fn error_policy(sc: Arc<StorageCluster>, error: &Error, _: Arc<Context>) -> Action {
    warn!(cluster = %sc.name_any(), "{error}");
    Action::requeue(Duration::from_secs(10))
}

pub async fn reconcile(sc: Arc<StorageCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(sc.name_any()))?;
    let api: Api<StorageCluster> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, sc, |event| async {
        match event {
            Finalizer::Apply(sc) => apply(&sc, &ctx).await,
            Finalizer::Cleanup(sc) => cleanup(&sc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

fn dynamic_api(client: &Client, d: &Desired, ns: &str) -> Api<DynamicObject> {
    if d.namespaced {
        Api::namespaced_with(client.clone(), ns, &d.resource)
    } else {
        Api::all_with(client.clone(), &d.resource)
    }
}

/// Whether the desired object changes fields Kubernetes refuses to update:
/// then it is deleted and made again (a StorageClass whose parameters
/// changed; volumes already provisioned keep theirs).
fn immutable_changed(d: &Desired, current: &DynamicObject) -> bool {
    match d.resource.kind.as_str() {
        "StorageClass" => [
            "provisioner",
            "parameters",
            "reclaimPolicy",
            "volumeBindingMode",
        ]
        .iter()
        .any(|f| d.object.data.get(f) != current.data.get(f)),
        // The server fills in the fields Shoal leaves out: compare those
        // Shoal sets.
        "CSIDriver" => !within(&d.object.data["spec"], &current.data["spec"]),
        _ => false,
    }
}

/// Whether every field `want` sets has the same value in `have`.
fn within(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    match (want, have) {
        (serde_json::Value::Object(w), serde_json::Value::Object(h)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| within(v, hv))),
        _ => want == have,
    }
}

/// The DaemonSet whose rollout `d` waits for, if `d` is one of the two
/// that hold each other's FUSE connections.
fn held_back_by<'a>(d: &Desired, names: &'a Names) -> Option<&'a str> {
    if d.resource.kind != "DaemonSet" {
        return None;
    }
    if d.name() == names.node {
        Some(&names.csi_node)
    } else if d.name() == names.csi_node {
        Some(&names.node)
    } else {
        None
    }
}

/// Whether a DaemonSet is replacing pods: not yet seen by its controller,
/// pods on an older template, or pods not available.
pub fn rolling(ds: &DaemonSet) -> bool {
    let Some(s) = &ds.status else {
        return true;
    };
    s.observed_generation < ds.metadata.generation
        || s.updated_number_scheduled.unwrap_or(0) < s.desired_number_scheduled
        || s.number_unavailable.unwrap_or(0) > 0
}

/// Whether the VolumeSnapshot CRDs are installed.
async fn snapshots_installed(client: &Client) -> Result<bool, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(crds
        .get_opt("volumesnapshotclasses.snapshot.storage.k8s.io")
        .await?
        .is_some())
}

async fn apply(sc: &StorageCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(sc);
    let client = &ctx.client;
    ensure_ca(sc, ctx, &names).await?;
    let snapshots = snapshots_installed(client).await?;
    let desired = objects::desired(sc, snapshots);
    let params = PatchParams::apply(MANAGER).force();
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &names.namespace);
    for d in &desired {
        let api = dynamic_api(client, d, &names.namespace);
        let current = api.get_opt(&d.name()).await?;
        if let (Some(_), Some(other)) = (&current, held_back_by(d, &names)) {
            // The peers' and the CSI node service's pods each keep the
            // other's FUSE connections alive: never roll both at once.
            if daemonsets
                .get_opt(other)
                .await?
                .is_some_and(|ds| rolling(&ds))
            {
                info!(
                    daemonset = d.name(),
                    other, "waits until {other} has rolled out"
                );
                continue;
            }
        }
        if let Some(current) = current
            && immutable_changed(d, &current)
        {
            info!(
                kind = d.resource.kind,
                name = d.name(),
                "replacing: immutable fields changed"
            );
            api.delete(&d.name(), &DeleteParams::default()).await?;
        }
        api.patch(&d.name(), &params, &Patch::Apply(&d.object))
            .await?;
    }
    prune(sc, client, &desired, snapshots).await?;
    let status = status(sc, client, &names).await?;
    let before = sc.status.clone().unwrap_or_default();
    if before.phase != status.phase {
        let (type_, reason) = match status.phase.as_str() {
            "Degraded" => (EventType::Warning, "Degraded"),
            phase => (EventType::Normal, phase),
        };
        let note = status
            .conditions
            .iter()
            .find(|c| c.status == "True")
            .map(|c| c.message.clone());
        publish(ctx, sc, type_, reason, note).await;
    }
    let api: Api<StorageCluster> = Api::namespaced(client.clone(), &names.namespace);
    api.patch_status(
        &sc.name_any(),
        &params,
        &Patch::Apply(json!({
            "apiVersion": "shoal.io/v1alpha1",
            "kind": "StorageCluster",
            "status": status,
        })),
    )
    .await?;
    Ok(Action::requeue(if status.phase == "Ready" {
        RESYNC
    } else {
        Duration::from_secs(5)
    }))
}

async fn publish(
    ctx: &Context,
    sc: &StorageCluster,
    type_: EventType,
    reason: &str,
    note: Option<String>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note,
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &sc.object_ref(&())).await {
        warn!("cannot record event {reason}: {e}");
    }
}

/// Makes the cluster's CA Secret (CA certificate and key, volume keyring)
/// unless it exists. It is never rewritten, and it outlives the
/// StorageCluster: the peers' data on the hosts is only usable with it.
async fn ensure_ca(sc: &StorageCluster, ctx: &Context, names: &Names) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    if secrets.get_opt(&names.ca).await?.is_some() {
        return Ok(());
    }
    let ca = shoal_core::ca::ClusterSecrets::generate().map_err(|e| Error::Ca(e.to_string()))?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names.ca,
            "namespace": names.namespace,
            "labels": {CLUSTER_LABEL: objects::cluster_label(sc), "app.kubernetes.io/name": "shoal"},
        },
        "stringData": {
            "ca.crt": ca.ca_cert_pem,
            "ca.key": ca.ca_key_pem,
            "keyring.key": ca.keyring_hex,
        },
    }))
    .expect("a valid Secret");
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            publish(
                ctx,
                sc,
                EventType::Normal,
                "CACreated",
                Some(format!("made Secret {}", names.ca)),
            )
            .await;
            Ok(())
        }
        // Made by another reconciliation meanwhile.
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The cluster-scoped kinds the operator makes (namespaced ones are
/// garbage-collected through their owner reference).
fn cluster_scoped(snapshots: bool) -> Vec<ApiResource> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
    let mut kinds = vec![
        ApiResource::erase::<ClusterRole>(&()),
        ApiResource::erase::<ClusterRoleBinding>(&()),
        ApiResource::erase::<CSIDriver>(&()),
        ApiResource::erase::<StorageClass>(&()),
    ];
    if snapshots {
        kinds.push(objects::snapshot_class_resource());
    }
    kinds
}

/// Deletes the cluster-scoped objects of this StorageCluster that are no
/// longer wanted (a StorageClass removed from the spec).
async fn prune(
    sc: &StorageCluster,
    client: &Client,
    desired: &[Desired],
    snapshots: bool,
) -> Result<(), Error> {
    let keep: BTreeSet<(String, String)> = desired
        .iter()
        .map(|d| (d.resource.kind.clone(), d.name()))
        .collect();
    delete_labelled(sc, client, snapshots, |kind, name| {
        !keep.contains(&(kind.to_string(), name.to_string()))
    })
    .await
}

async fn delete_labelled(
    sc: &StorageCluster,
    client: &Client,
    snapshots: bool,
    doomed: impl Fn(&str, &str) -> bool,
) -> Result<(), Error> {
    let selector = format!("{CLUSTER_LABEL}={}", objects::cluster_label(sc));
    for resource in cluster_scoped(snapshots) {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        for object in api.list(&ListParams::default().labels(&selector)).await? {
            let name = object.name_any();
            if doomed(&resource.kind, &name) {
                info!(kind = resource.kind, name, "deleting");
                deleted(api.delete(&name, &DeleteParams::default()).await)?;
            }
        }
    }
    Ok(())
}

async fn cleanup(sc: &StorageCluster, ctx: &Context) -> Result<Action, Error> {
    if sc.spec.storage.wipe_on_delete {
        wipe(sc, ctx).await?;
    }
    let snapshots = snapshots_installed(&ctx.client).await?;
    delete_labelled(sc, &ctx.client, snapshots, |_, _| true).await?;
    let what = if sc.spec.storage.wipe_on_delete {
        "removed the cluster's objects and erased its data"
    } else {
        "removed the cluster's objects; data on the hosts and the CA Secret stay"
    };
    publish(ctx, sc, EventType::Normal, "Deleted", Some(what.into())).await;
    Ok(Action::await_change())
}

/// The outcome of a delete: done, or there was nothing to delete.
fn deleted<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Erases the peers' data: stops the peers, runs the wipe DaemonSet until
/// every node reports its host path empty, then removes it and the CA
/// Secret. Until then it fails with [`Error::Wiping`], so the finalizer
/// stays and the deletion is retried.
async fn wipe(sc: &StorageCluster, ctx: &Context) -> Result<(), Error> {
    let names = Names::of(sc);
    let client = &ctx.client;
    let secrets = Api::<Secret>::namespaced(client.clone(), &names.namespace);
    // The CA Secret goes last: without it the wipe is done, and a second
    // look at a cluster already gone (a stale cache) must not start it again.
    if secrets.get_opt(&names.ca).await?.is_none() {
        return Ok(());
    }
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &names.namespace);
    for ds in [&names.node, &names.csi_node] {
        deleted(daemonsets.delete(ds, &DeleteParams::default()).await)?;
    }
    deleted(
        Api::<Deployment>::namespaced(client.clone(), &names.namespace)
            .delete(&names.controller, &DeleteParams::default())
            .await,
    )?;
    let d = objects::wipe_daemonset(sc);
    dynamic_api(client, &d, &names.namespace)
        .patch(
            &d.name(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&d.object),
        )
        .await?;
    let current = daemonsets.get(&d.name()).await?;
    // Counts mean something only once the DaemonSet controller has seen
    // this version.
    let seen = current.status.as_ref().and_then(|s| s.observed_generation);
    let (desired, ready) = match &current.status {
        Some(s) if seen.is_some() && seen == current.metadata.generation => {
            (s.desired_number_scheduled, s.number_ready)
        }
        _ => (1, 0),
    };
    if ready < desired {
        return Err(Error::Wiping(ready, desired));
    }
    deleted(daemonsets.delete(&d.name(), &DeleteParams::default()).await)?;
    deleted(secrets.delete(&names.ca, &DeleteParams::default()).await)?;
    publish(
        ctx,
        sc,
        EventType::Normal,
        "DataWiped",
        Some(format!(
            "erased {} on {desired} nodes",
            sc.spec.storage.host_path
        )),
    )
    .await;
    Ok(())
}

/// The status the peers' DaemonSet and the controller Deployment show.
async fn status(
    sc: &StorageCluster,
    client: &Client,
    names: &Names,
) -> Result<StorageClusterStatus, Error> {
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &names.namespace);
    let ds = daemonsets
        .get_opt(&names.node)
        .await?
        .and_then(|d| d.status);
    let csi = daemonsets
        .get_opt(&names.csi_node)
        .await?
        .and_then(|d| d.status);
    let deploy = Api::<Deployment>::namespaced(client.clone(), &names.namespace)
        .get_opt(&names.controller)
        .await?
        .and_then(|d| d.status);
    let observed = PeerCounts {
        desired: ds.as_ref().map_or(0, |s| s.desired_number_scheduled),
        ready: ds.as_ref().map_or(0, |s| s.number_ready),
        updated: ds
            .as_ref()
            .and_then(|s| s.updated_number_scheduled)
            .unwrap_or(0),
        controllers: deploy.and_then(|s| s.available_replicas).unwrap_or(0),
        csi_nodes: csi.as_ref().map_or(0, |s| s.number_ready),
    };
    let reported = ask_peers(sc, client, names).await?;
    let previous = sc.status.clone().unwrap_or_default();
    Ok(summarise(sc, &observed, reported, &previous.conditions))
}

/// Asks every ready peer of the cluster for its status.
async fn ask_peers(
    sc: &StorageCluster,
    client: &Client,
    names: &Names,
) -> Result<Option<peers::Reported>, Error> {
    let selector = format!(
        "{CLUSTER_LABEL}={},app.kubernetes.io/component=node",
        objects::cluster_label(sc)
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &names.namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let ips: Vec<String> = pods
        .items
        .iter()
        .filter_map(|p| p.status.as_ref())
        .filter(|s| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .filter_map(|s| s.pod_ip.clone())
        .collect();
    let answers = futures::future::join_all(ips.iter().map(|ip| peers::fetch(ip))).await;
    let answers: Vec<peers::PeerStatus> = answers
        .into_iter()
        .filter_map(|a| a.map_err(|e| warn!("peer status: {e}")).ok())
        .collect();
    Ok(peers::summarise(&answers, ips.len()))
}

/// What the operator counts of the workloads it made.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerCounts {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    pub controllers: i32,
    /// CSI node services ready.
    pub csi_nodes: i32,
}

/// Phase and conditions from the counts and what the peers report (a
/// pure function; conditions keep their transition time while their
/// status holds).
pub fn summarise(
    sc: &StorageCluster,
    c: &PeerCounts,
    reported: Option<peers::Reported>,
    previous: &[Condition],
) -> StorageClusterStatus {
    let under_replicated = reported.and_then(|r| r.under_replicated).unwrap_or(0);
    let replication = i32::from(sc.spec.replication);
    let rolling = c.updated < c.desired;
    let ready = c.desired > 0
        && c.ready == c.desired
        && c.csi_nodes >= c.desired
        && !rolling
        && c.controllers > 0;
    let (degraded, degraded_reason, degraded_message) = if c.desired > 0 && c.desired < replication
    {
        (
            true,
            "TooFewNodes",
            format!("{} storage nodes for replication {replication}", c.desired),
        )
    } else if c.ready < replication && c.desired > 0 && !rolling {
        (
            true,
            "BelowReplication",
            format!(
                "{} of {} peers ready; replication is {replication}",
                c.ready, c.desired
            ),
        )
    } else if under_replicated > 0 {
        (
            true,
            "UnderReplicated",
            format!("{under_replicated} blocks have fewer live replicas than {replication}"),
        )
    } else {
        (
            false,
            "Healthy",
            format!("{} of {} peers ready", c.ready, c.desired),
        )
    };
    let progressing =
        rolling || c.ready < c.desired || c.csi_nodes < c.desired || c.controllers == 0;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = sc.metadata.generation.unwrap_or(0);
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_string();
        let since = previous
            .iter()
            .find(|p| p.type_ == type_ && p.status == status)
            .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: Some(generation),
        }
    };
    let conditions = vec![
        condition(
            "Ready",
            ready,
            if ready { "AllPeersReady" } else { "NotReady" },
            format!(
                "{}/{} peers ready, {}/{} CSI node services ready, {} CSI controllers available",
                c.ready, c.desired, c.csi_nodes, c.desired, c.controllers
            ),
        ),
        condition(
            "Progressing",
            progressing,
            if rolling {
                "RollingOut"
            } else if progressing {
                "Starting"
            } else {
                "Settled"
            },
            format!(
                "{}/{} peers on the current configuration",
                c.updated, c.desired
            ),
        ),
        condition("Degraded", degraded, degraded_reason, degraded_message),
    ];
    let phase = if c.desired == 0 {
        "Pending"
    } else if degraded {
        "Degraded"
    } else if ready {
        "Ready"
    } else {
        "Progressing"
    };
    // What the peers report, else what the ready ones were told to offer.
    let per_node = objects::parse_quantity(&sc.spec.storage.capacity).unwrap_or(0);
    let capacity = reported.map_or(per_node.saturating_mul(c.ready.max(0) as u64), |r| {
        r.capacity
    });
    StorageClusterStatus {
        phase: phase.into(),
        conditions,
        ready_nodes: c.ready,
        desired_nodes: c.desired,
        ready: format!("{}/{}", c.ready, c.desired),
        capacity: objects::quantity(capacity),
        used: reported.map(|r| objects::quantity(r.used)),
        under_replicated_blocks: reported.and_then(|r| r.under_replicated).map(|n| n as i64),
        observed_generation: generation,
    }
}

/// Writes the zone and rack of this pod's node (`NODE_NAME`), read from
/// the labels the StorageCluster names (`ZONE_LABEL`, `RACK_LABEL`), to
/// `DIR/zone` and `DIR/rack`, and to `DIR/join` the peer address
/// (`IP:port`, one a line) of every other node `selector` picks: the peers'
/// init container. Peers run on their node's network, so a node's internal
/// address is its peer's, and no cluster DNS is needed to find them.
pub async fn node_topology(
    client: Client,
    out: &std::path::Path,
    selector: &str,
    port: u16,
) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"));
    let node_name = var("NODE_NAME")?;
    let nodes = Api::<Node>::all(client);
    let node = nodes.get(&node_name).await?;
    let labels = node.labels();
    for (file, label) in [("zone", var("ZONE_LABEL")?), ("rack", var("RACK_LABEL")?)] {
        let value = labels
            .get(&label)
            .cloned()
            .unwrap_or_else(|| "default".into());
        std::fs::write(out.join(file), &value)?;
        info!(node = node_name, label, value, "{file}");
    }
    let others = nodes.list(&ListParams::default().labels(selector)).await?;
    let join = peer_addresses(&others.items, &node_name, port);
    std::fs::write(out.join("join"), join.join("\n"))?;
    info!(node = node_name, peers = ?join, "join");
    Ok(())
}

/// `IP:port` of the internal address of every node but `me`.
fn peer_addresses(nodes: &[Node], me: &str, port: u16) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.name_any() != me)
        .filter_map(|n| {
            n.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| match a.address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                    _ => format!("{}:{port}", a.address),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(replication: u8) -> StorageCluster {
        let mut sc = StorageCluster::new(
            "main",
            serde_json::from_value(json!({"replication": replication})).unwrap(),
        );
        sc.metadata.generation = Some(4);
        sc
    }

    fn counts(desired: i32, ready: i32, updated: i32, controllers: i32) -> PeerCounts {
        PeerCounts {
            desired,
            ready,
            updated,
            controllers,
            csi_nodes: desired,
        }
    }

    fn condition<'a>(s: &'a StorageClusterStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn phases_follow_the_peers() {
        let sc = cluster(3);
        let s = summarise(&sc, &counts(0, 0, 0, 0), None, &[]);
        assert_eq!(s.phase, "Pending");
        let s = summarise(&sc, &counts(4, 2, 4, 1), None, &[]);
        assert_eq!(s.phase, "Degraded");
        assert_eq!(condition(&s, "Degraded").reason, "BelowReplication");
        let s = summarise(&sc, &counts(4, 3, 2, 1), None, &[]);
        assert_eq!(s.phase, "Progressing");
        assert_eq!(condition(&s, "Progressing").reason, "RollingOut");
        let s = summarise(&sc, &counts(2, 2, 2, 1), None, &[]);
        assert_eq!(condition(&s, "Degraded").reason, "TooFewNodes");
        let s = summarise(&sc, &counts(4, 4, 4, 2), None, &[]);
        assert_eq!(s.phase, "Ready");
        assert_eq!(s.ready, "4/4");
        assert_eq!(s.capacity, "400Gi");
        assert_eq!(s.observed_generation, 4);
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "Degraded").status, "False");
        assert_eq!(s.used, None, "unknown until the peers report");
        // What the peers report wins over the spec.
        let reported = peers::Reported {
            capacity: 3 << 30,
            used: 1 << 30,
            under_replicated: Some(7),
        };
        let s = summarise(&sc, &counts(4, 4, 4, 2), Some(reported), &[]);
        assert_eq!(
            (s.capacity.as_str(), s.used.as_deref()),
            ("3Gi", Some("1Gi"))
        );
        assert_eq!(s.under_replicated_blocks, Some(7));
        assert_eq!(s.phase, "Degraded");
        assert_eq!(condition(&s, "Degraded").reason, "UnderReplicated");
    }

    #[test]
    fn peers_join_the_other_nodes_at_their_internal_addresses() {
        let node = |name: &str, addresses: serde_json::Value| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"addresses": addresses},
            }))
            .unwrap()
        };
        let nodes = [
            node(
                "a",
                json!([{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "10.0.0.1"}]),
            ),
            node("b", json!([{"type": "InternalIP", "address": "10.0.0.2"}])),
            node("c", json!([{"type": "InternalIP", "address": "fd00::3"}])),
            node("d", json!([{"type": "Hostname", "address": "d"}])),
        ];
        assert_eq!(
            peer_addresses(&nodes, "b", 7700),
            ["10.0.0.1:7700", "[fd00::3]:7700"]
        );
    }

    #[test]
    fn only_refused_updates_replace_objects() {
        let sc = cluster(3);
        let objects = crate::objects::desired(&sc, false);
        let class = objects
            .iter()
            .find(|d| d.resource.kind == "StorageClass")
            .unwrap();
        let mut current = class.object.clone();
        assert!(!immutable_changed(class, &current));
        current.data["parameters"]["replicas"] = json!("1");
        assert!(immutable_changed(class, &current));
        let driver = objects
            .iter()
            .find(|d| d.resource.kind == "CSIDriver")
            .unwrap();
        let mut current = driver.object.clone();
        current.data["spec"]["requiresRepublish"] = json!(false);
        assert!(
            !immutable_changed(driver, &current),
            "server defaults are not changes"
        );
        current.data["spec"]["attachRequired"] = json!(true);
        assert!(immutable_changed(driver, &current));
    }

    #[test]
    fn transition_times_hold_while_a_condition_holds() {
        let sc = cluster(3);
        let first = summarise(&sc, &counts(3, 3, 3, 1), None, &[]);
        let mut old = first.conditions.clone();
        let long_ago = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        for c in &mut old {
            c.last_transition_time = long_ago.clone();
        }
        let again = summarise(&sc, &counts(3, 3, 3, 1), None, &old);
        assert_eq!(condition(&again, "Ready").last_transition_time, long_ago);
        let changed = summarise(&sc, &counts(3, 1, 3, 1), None, &old);
        assert_ne!(condition(&changed, "Ready").last_transition_time, long_ago);
    }
}
