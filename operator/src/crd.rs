//! The `StorageCluster` resource: what users edit to run and tune Shoal.
//! The schema the API server validates against is generated from these
//! types, so bad values (replication 9, failure domain "planet", a
//! relative host path) are refused by `kubectl apply` with a message that
//! names the field.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Shoal cluster: storage peers on the selected nodes, the CSI driver,
/// and the storage classes that provision volumes on it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.io",
    version = "v1alpha1",
    kind = "StorageCluster",
    namespaced,
    status = "StorageClusterStatus",
    shortname = "shoal",
    printcolumn = r#"{"name": "Replication", "type": "integer", "jsonPath": ".spec.replication"}"#,
    printcolumn = r#"{"name": "Failure domain", "type": "string", "jsonPath": ".spec.placement.failureDomain"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.ready"}"#,
    printcolumn = r#"{"name": "Capacity", "type": "string", "jsonPath": ".status.capacity"}"#,
    printcolumn = r#"{"name": "Used", "type": "string", "jsonPath": ".status.used"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StorageClusterSpec {
    /// Copies kept of every block, each in a different failure domain.
    #[serde(default = "default_replication")]
    #[schemars(range(min = 1, max = 7))]
    pub replication: u8,
    #[serde(default)]
    pub placement: Placement,
    /// Which nodes run storage peers.
    #[serde(default)]
    pub nodes: Nodes,
    #[serde(default)]
    pub storage: Storage,
    /// StorageClasses that provision Shoal volumes.
    #[serde(default = "default_storage_classes")]
    pub storage_classes: Vec<StorageClassSpec>,
    #[serde(default)]
    pub csi: Csi,
    #[serde(default)]
    pub images: Images,
    #[serde(default)]
    pub resources: Resources,
}

fn default_replication() -> u8 {
    3
}

/// What replicas of one block must not share: Shoal's placement policy.
pub use shoal_core::FailureDomain;

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    #[serde(default)]
    pub failure_domain: FailureDomain,
    /// The node label that names a node's zone.
    #[serde(default = "default_zone_label")]
    #[schemars(length(min = 1, max = 316))]
    pub zone_label: String,
    /// The node label that names a node's rack.
    #[serde(default = "default_rack_label")]
    #[schemars(length(min = 1, max = 316))]
    pub rack_label: String,
    /// Each peer also keeps a copy of the blocks it writes (the data of the
    /// volumes mounted on its node), beyond the replicas, and reads it
    /// locally.
    #[serde(default)]
    pub local_copy: bool,
}

fn default_zone_label() -> String {
    "topology.kubernetes.io/zone".into()
}

fn default_rack_label() -> String {
    "topology.shoal.io/rack".into()
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            failure_domain: FailureDomain::default(),
            zone_label: default_zone_label(),
            rack_label: default_rack_label(),
            local_copy: false,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Nodes {
    /// Labels a node must have to run a storage peer (all nodes if empty).
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Where each peer keeps its blocks on its node.
    #[serde(default = "default_host_path")]
    #[schemars(regex(pattern = r"^/[^\x00]*$"), length(max = 4096))]
    pub host_path: String,
    /// Bytes each peer offers, e.g. 100Gi or 500GB.
    #[serde(default = "default_capacity")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P|k)?$"))]
    pub capacity: String,
    /// When the StorageCluster is deleted, also erase the peers' data on
    /// every node and the cluster's CA Secret. Off by default: the data
    /// stays, and a StorageCluster of the same name finds it again.
    #[serde(default)]
    pub wipe_on_delete: bool,
}

fn default_host_path() -> String {
    "/var/lib/shoal".into()
}

fn default_capacity() -> String {
    "100Gi".into()
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            host_path: default_host_path(),
            capacity: default_capacity(),
            wipe_on_delete: false,
        }
    }
}

/// One StorageClass that provisions Shoal volumes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClassSpec {
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// Mark it the cluster's default StorageClass.
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    #[serde(default = "yes")]
    pub allow_volume_expansion: bool,
    /// Passed to the CSI driver: `replicas` (1-7) and `failureDomain`.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

fn default_storage_classes() -> Vec<StorageClassSpec> {
    vec![StorageClassSpec {
        name: "shoal".into(),
        default: false,
        reclaim_policy: ReclaimPolicy::Delete,
        allow_volume_expansion: true,
        parameters: BTreeMap::new(),
    }]
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    #[default]
    Delete,
    Retain,
}

/// How the CSI node service runs beside kubelet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Csi {
    /// Run the upstream node-driver-registrar and livenessprobe sidecars
    /// beside the CSI node service. When false, shoal-csi registers itself
    /// with kubelet (the plugin registration API) and serves its own
    /// liveness endpoint: two containers and two images fewer per node.
    #[serde(default = "yes")]
    pub node_sidecars: bool,
}

impl Default for Csi {
    fn default() -> Self {
        Self {
            node_sidecars: true,
        }
    }
}

/// Container images. Shoal's own default to this operator's version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    #[serde(default = "images::shoal")]
    pub shoal: String,
    #[serde(default = "images::csi")]
    pub csi: String,
    #[serde(default = "images::operator")]
    pub operator: String,
    #[serde(default = "images::registrar")]
    pub node_driver_registrar: String,
    #[serde(default = "images::livenessprobe")]
    pub livenessprobe: String,
    #[serde(default = "images::provisioner")]
    pub provisioner: String,
    #[serde(default = "images::resizer")]
    pub resizer: String,
    #[serde(default = "images::snapshotter")]
    pub snapshotter: String,
    #[serde(default = "images::pull_policy")]
    #[schemars(regex(pattern = "^(Always|IfNotPresent|Never)$"))]
    pub pull_policy: String,
}

/// Default images.
pub mod images {
    const VERSION: &str = env!("CARGO_PKG_VERSION");

    pub fn shoal() -> String {
        format!("ghcr.io/shoal-storage/shoal:{VERSION}")
    }
    pub fn csi() -> String {
        format!("ghcr.io/shoal-storage/shoal-csi:{VERSION}")
    }
    pub fn operator() -> String {
        format!("ghcr.io/shoal-storage/shoal-operator:{VERSION}")
    }
    pub fn registrar() -> String {
        "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0".into()
    }
    pub fn livenessprobe() -> String {
        "registry.k8s.io/sig-storage/livenessprobe:v2.15.0".into()
    }
    pub fn provisioner() -> String {
        "registry.k8s.io/sig-storage/csi-provisioner:v5.2.0".into()
    }
    pub fn resizer() -> String {
        "registry.k8s.io/sig-storage/csi-resizer:v1.13.2".into()
    }
    pub fn snapshotter() -> String {
        "registry.k8s.io/sig-storage/csi-snapshotter:v8.2.1".into()
    }
    pub fn pull_policy() -> String {
        "IfNotPresent".into()
    }
}

impl Default for Images {
    fn default() -> Self {
        Self {
            shoal: images::shoal(),
            csi: images::csi(),
            operator: images::operator(),
            node_driver_registrar: images::registrar(),
            livenessprobe: images::livenessprobe(),
            provisioner: images::provisioner(),
            resizer: images::resizer(),
            snapshotter: images::snapshotter(),
            pull_policy: images::pull_policy(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// The storage peer container.
    pub peer: Option<ResourceRequirements>,
    /// The shoal-csi containers.
    pub csi: Option<ResourceRequirements>,
}

/// What the operator last saw of the cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClusterStatus {
    /// Pending, Progressing, Ready or Degraded.
    pub phase: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub ready_nodes: i32,
    #[serde(default)]
    pub desired_nodes: i32,
    /// readyNodes/desiredNodes, for the printer column.
    pub ready: String,
    /// Bytes the peers offer, in Kubernetes quantity form.
    pub capacity: String,
    /// Bytes stored and blocks with fewer live replicas than the
    /// replication asks, as the peers report them (absent until they do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_replicated_blocks: Option<i64>,
    #[serde(default)]
    pub observed_generation: i64,
}
