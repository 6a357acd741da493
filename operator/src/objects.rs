//! The Kubernetes objects one `StorageCluster` becomes, as plain data: a
//! pure function of the resource, tested without an API server. The
//! reconciler applies them with server-side apply.
//!
//! Namespaced objects carry an owner reference to the StorageCluster, so
//! deleting it garbage-collects them; cluster-scoped ones (RBAC, the
//! CSIDriver, StorageClasses, the VolumeSnapshotClass) cannot be owned by
//! a namespaced object, so they carry the [`CLUSTER_LABEL`] and the
//! finalizer deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::StorageCluster;

/// The CSI driver's name.
pub const DRIVER: &str = "csi.shoal.io";
/// Labels every object made for a StorageCluster: `NAMESPACE.NAME`.
pub const CLUSTER_LABEL: &str = "shoal.io/cluster";
/// The QUIC port peers talk on.
pub const PEER_PORT: i32 = 7700;
/// Where kubelet keeps pods' volumes and CSI plugins' sockets.
const KUBELET_DIR: &str = "/var/lib/kubelet";
/// Where, in the peers' data dir, the CSI node service keeps the peer's
/// FUSE connections (see `shoal-csi --fuse-keeper`).
const KEEPER_SOCKET: &str = "/data/fuse-keeper.sock";

/// One object to apply.
#[derive(Debug, Clone)]
pub struct Desired {
    pub resource: ApiResource,
    pub namespaced: bool,
    pub object: DynamicObject,
}

impl Desired {
    pub fn name(&self) -> String {
        self.object.name_any()
    }
}

/// The VolumeSnapshotClass type, from the external-snapshotter's CRDs
/// (present only where they are installed).
pub fn snapshot_class_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotClass",
    ))
}

/// The value of [`CLUSTER_LABEL`] for a StorageCluster.
pub fn cluster_label(sc: &StorageCluster) -> String {
    format!("{}.{}", sc.namespace().unwrap_or_default(), sc.name_any())
}

/// Names of the objects made for a StorageCluster.
#[derive(Debug, Clone)]
pub struct Names {
    pub namespace: String,
    pub cluster: String,
    pub node: String,
    pub csi_node: String,
    pub controller: String,
    pub peers: String,
    pub config: String,
    pub ca: String,
    /// Cluster-scoped objects are unique across namespaces.
    pub cluster_scoped: String,
}

impl Names {
    pub fn of(sc: &StorageCluster) -> Self {
        let name = sc.name_any();
        let namespace = sc.namespace().unwrap_or_default();
        Self {
            node: format!("{name}-node"),
            csi_node: format!("{name}-csi-node"),
            controller: format!("{name}-csi-controller"),
            peers: format!("{name}-peers"),
            config: format!("{name}-config"),
            ca: format!("{name}-ca"),
            cluster_scoped: format!("shoal-{namespace}-{name}"),
            cluster: name,
            namespace,
        }
    }
}

fn typed<K: Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

/// Parses a Kubernetes quantity of bytes ("100Gi", "500G", "1.5Ti").
pub fn parse_quantity(q: &str) -> Option<u64> {
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, unit) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    Some((number * scale) as u64)
}

/// Bytes as a Kubernetes quantity, in the largest binary unit that keeps
/// one decimal of precision.
pub fn quantity(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut value = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if unit.is_empty() || value.fract() == 0.0 {
        format!("{value:.0}{unit}")
    } else {
        format!("{value:.1}{unit}")
    }
}

/// The peer settings a StorageCluster's spec decides, as the ConfigMap
/// holds them (peers take them as flags).
fn peer_config(sc: &StorageCluster) -> BTreeMap<String, String> {
    let s = &sc.spec;
    let capacity = parse_quantity(&s.storage.capacity).unwrap_or(0);
    BTreeMap::from([
        ("REPLICATION".into(), s.replication.to_string()),
        (
            "FAILURE_DOMAIN".into(),
            s.placement.failure_domain.as_str().into(),
        ),
        ("ZONE_LABEL".into(), s.placement.zone_label.clone()),
        ("RACK_LABEL".into(), s.placement.rack_label.clone()),
        ("LOCAL_COPY".into(), s.placement.local_copy.to_string()),
        ("CAPACITY".into(), capacity.to_string()),
    ])
}

/// A short digest of the peer configuration: part of the peers' pod
/// template, so a change rolls them one by one.
pub fn config_hash(sc: &StorageCluster) -> String {
    let text = serde_json::to_string(&peer_config(sc)).expect("strings serialise");
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

struct Builder<'a> {
    sc: &'a StorageCluster,
    names: Names,
    labels: BTreeMap<String, String>,
    out: Vec<Desired>,
}

impl Builder<'_> {
    fn meta(&self, name: &str, namespaced: bool, component: &str) -> ObjectMeta {
        let mut labels = self.labels.clone();
        labels.insert("app.kubernetes.io/component".into(), component.into());
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespaced.then(|| self.names.namespace.clone()),
            labels: Some(labels),
            owner_references: namespaced
                .then(|| self.sc.controller_owner_ref(&()).into_iter().collect()),
            ..Default::default()
        }
    }

    fn push(
        &mut self,
        resource: ApiResource,
        namespaced: bool,
        name: &str,
        component: &str,
        body: Value,
    ) {
        let mut object = DynamicObject::new(name, &resource).data(body);
        object.metadata = self.meta(name, namespaced, component);
        self.out.push(Desired {
            resource,
            namespaced,
            object,
        });
    }
}

/// Every object of a StorageCluster but its CA Secret (which is made once
/// and never rewritten). `snapshots` says whether the VolumeSnapshot CRDs
/// are installed.
pub fn desired(sc: &StorageCluster, snapshots: bool) -> Vec<Desired> {
    let names = Names::of(sc);
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "shoal".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "shoal-operator".to_string(),
        ),
        (CLUSTER_LABEL.to_string(), cluster_label(sc)),
    ]);
    let mut b = Builder {
        sc,
        names: names.clone(),
        labels,
        out: Vec::new(),
    };
    let n = &names;
    let spec = &sc.spec;
    let images = &spec.images;

    // Identities and least-privilege RBAC.
    for account in [&n.node, &n.controller] {
        b.push(typed::<ServiceAccount>(), true, account, "rbac", json!({}));
    }
    let node_role = format!("{}-node", n.cluster_scoped);
    b.push(
        typed::<ClusterRole>(),
        false,
        &node_role,
        "rbac",
        json!({"rules": [
            // The peers' init container reads its node's zone and rack
            // labels, and the addresses of the other storage nodes.
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]},
        ]}),
    );
    let controller_role = format!("{}-controller", n.cluster_scoped);
    b.push(
        typed::<ClusterRole>(),
        false,
        &controller_role,
        "rbac",
        json!({"rules": [
            {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "watch", "create", "delete", "patch", "update"]},
            {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "update", "patch"]},
            {"apiGroups": [""], "resources": ["persistentvolumeclaims/status"], "verbs": ["update", "patch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses", "csinodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots", "volumesnapshotclasses"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents/status"], "verbs": ["update", "patch"]},
        ]}),
    );
    for (role, account) in [(&node_role, &n.node), (&controller_role, &n.controller)] {
        b.push(
            typed::<ClusterRoleBinding>(),
            false,
            role,
            "rbac",
            json!({
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": n.namespace}],
            }),
        );
    }
    // The CSI sidecars elect a leader with Leases in the namespace.
    let election = format!("{}-leader-election", n.cluster);
    b.push(
        typed::<Role>(),
        true,
        &election,
        "rbac",
        json!({"rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
        ]}),
    );
    b.push(
        typed::<RoleBinding>(),
        true,
        &election,
        "rbac",
        json!({
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": election},
            "subjects": [{"kind": "ServiceAccount", "name": n.controller, "namespace": n.namespace}],
        }),
    );

    // Peer configuration and discovery.
    b.push(
        typed::<ConfigMap>(),
        true,
        &n.config,
        "config",
        json!({"data": peer_config(sc)}),
    );
    b.push(
        typed::<Service>(),
        true,
        &n.peers,
        "peer",
        json!({"spec": {
            "clusterIP": "None",
            // Peers find each other while they start, before they are ready.
            "publishNotReadyAddresses": true,
            "selector": {CLUSTER_LABEL: cluster_label(sc), "app.kubernetes.io/component": "node"},
            "ports": [{"name": "quic", "port": PEER_PORT, "protocol": "UDP"}],
        }}),
    );

    // The peers' DaemonSet: one storage peer per node, on the node's own
    // network (its address stays the peer's across restarts, and no pod
    // network or cluster DNS stands between peers), joining the peers of
    // the other selected nodes.
    let pull = &images.pull_policy;
    let peer_script = format!(
        "exec shoal node run --dir /data --ca /ca --listen \"$POD_IP:{PEER_PORT}\" \
         --retry-join $(sed 's/^/--join /' /topology/join) \
         --zone \"$(cat /topology/zone)\" --rack \"$(cat /topology/rack)\" \
         --capacity \"$CAPACITY\" --replicas \"$REPLICATION\" --failure-domain \"$FAILURE_DOMAIN\" \
         --status-listen \"$POD_IP:{status}\" --fuse-keeper {KEEPER_SOCKET} \
         $([ \"$LOCAL_COPY\" = true ] && echo --local-copy)",
        status = crate::peers::STATUS_PORT,
    );
    let component_labels = |component: &str| json!({CLUSTER_LABEL: cluster_label(sc), "app.kubernetes.io/name": "shoal", "app.kubernetes.io/component": component});
    let node_labels = component_labels("node");
    let resources = |r: &Option<k8s_openapi::api::core::v1::ResourceRequirements>| {
        r.as_ref().map_or(json!({}), |r| {
            serde_json::to_value(r).expect("resources serialise")
        })
    };
    let selector = spec
        .nodes
        .node_selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let kubelet_volume =
        json!({"name": "kubelet", "hostPath": {"path": KUBELET_DIR, "type": "Directory"}});
    let kubelet_mount =
        json!({"name": "kubelet", "mountPath": KUBELET_DIR, "mountPropagation": "Bidirectional"});
    let data_volume = json!({"name": "data", "hostPath": {"path": spec.storage.host_path, "type": "DirectoryOrCreate"}});
    b.push(
        typed::<DaemonSet>(),
        true,
        &n.node,
        "node",
        json!({"spec": {
            "selector": {"matchLabels": node_labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": node_labels,
                    "annotations": {"shoal.io/config-hash": config_hash(sc)},
                },
                "spec": {
                    "serviceAccountName": n.node,
                    "nodeSelector": spec.nodes.node_selector,
                    "tolerations": spec.nodes.tolerations,
                    "priorityClassName": "system-node-critical",
                    "hostNetwork": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    // Time to commit what the mounts hold before the peer
                    // hands their FUSE connections over.
                    "terminationGracePeriodSeconds": 60,
                    "initContainers": [{
                        "name": "topology",
                        "image": images.operator,
                        "imagePullPolicy": pull,
                        "args": ["node-topology", "--out", "/topology", "--peers", selector, "--port", PEER_PORT.to_string()],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        ],
                        "envFrom": [{"configMapRef": {"name": n.config}}],
                        "volumeMounts": [{"name": "topology", "mountPath": "/topology"}],
                    }],
                    "containers": [{
                        "name": "peer",
                        "image": images.shoal,
                        "imagePullPolicy": pull,
                        "command": ["/bin/sh", "-c", peer_script],
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        ],
                        "envFrom": [{"configMapRef": {"name": n.config}}],
                        "securityContext": {"privileged": true},
                        "resources": resources(&spec.resources.peer),
                        "ports": [
                            {"name": "quic", "containerPort": PEER_PORT, "protocol": "UDP"},
                            {"name": "status", "containerPort": crate::peers::STATUS_PORT},
                        ],
                        "readinessProbe": {
                            "exec": {"command": ["shoal", "status", "--dir", "/data"]},
                            "periodSeconds": 10,
                        },
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data"},
                            {"name": "ca", "mountPath": "/ca", "readOnly": true},
                            {"name": "topology", "mountPath": "/topology", "readOnly": true},
                            kubelet_mount,
                            {"name": "fuse", "mountPath": "/dev/fuse"},
                        ],
                    }],
                    "volumes": [
                        data_volume,
                        {"name": "ca", "secret": {"secretName": n.ca, "defaultMode": 0o400}},
                        {"name": "topology", "emptyDir": {}},
                        kubelet_volume,
                        {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
                    ],
                },
            },
        }}),
    );

    // The CSI node service's DaemonSet, apart from the peers': it holds a
    // second reference to every FUSE connection the peer on its node
    // serves, so a peer pod deleted, restarted or rolled to a new version
    // leaves the kernel mounts alive, and its successor takes them over.
    let plugin_dir = format!("{KUBELET_DIR}/plugins/{DRIVER}");
    let csi_labels = component_labels("csi-node");
    let mut csi_args = vec![
        "--endpoint".to_string(),
        "unix:///csi/csi.sock".into(),
        "--mode".into(),
        "node".into(),
        "--node-id".into(),
        "$(NODE_NAME)".into(),
        "--peer-dir".into(),
        "/data".into(),
        "--fuse-keeper".into(),
        KEEPER_SOCKET.into(),
    ];
    let mut csi_containers = vec![];
    if !spec.csi.node_sidecars {
        csi_args.extend([
            "--registration-dir".to_string(),
            "/registration".into(),
            "--kubelet-endpoint".into(),
            format!("{plugin_dir}/csi.sock"),
            "--healthz-listen".into(),
            "0.0.0.0:9808".into(),
        ]);
    }
    csi_containers.push(json!({
        "name": "csi-node",
        "image": images.csi,
        "imagePullPolicy": pull,
        "args": csi_args,
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
        "securityContext": {"privileged": true},
        "resources": resources(&spec.resources.csi),
        "ports": [{"name": "healthz", "containerPort": 9808}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "healthz"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 5,
        },
        "volumeMounts": [
            {"name": "plugin", "mountPath": "/csi"},
            {"name": "registration", "mountPath": "/registration"},
            {"name": "data", "mountPath": "/data"},
            kubelet_mount,
        ],
    }));
    if spec.csi.node_sidecars {
        csi_containers.push(json!({
            "name": "node-driver-registrar",
            "image": images.node_driver_registrar,
            "imagePullPolicy": pull,
            "args": ["--csi-address=/csi/csi.sock", format!("--kubelet-registration-path={plugin_dir}/csi.sock")],
            "volumeMounts": [
                {"name": "plugin", "mountPath": "/csi"},
                {"name": "registration", "mountPath": "/registration"},
            ],
        }));
        csi_containers.push(json!({
            "name": "livenessprobe",
            "image": images.livenessprobe,
            "imagePullPolicy": pull,
            "args": ["--csi-address=/csi/csi.sock"],
            "volumeMounts": [{"name": "plugin", "mountPath": "/csi"}],
        }));
    }
    b.push(
        typed::<DaemonSet>(),
        true,
        &n.csi_node,
        "csi-node",
        json!({"spec": {
            "selector": {"matchLabels": csi_labels},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": csi_labels},
                "spec": {
                    "serviceAccountName": n.node,
                    "nodeSelector": spec.nodes.node_selector,
                    "tolerations": spec.nodes.tolerations,
                    "priorityClassName": "system-node-critical",
                    "containers": csi_containers,
                    "volumes": [
                        data_volume,
                        kubelet_volume,
                        {"name": "plugin", "hostPath": {"path": plugin_dir, "type": "DirectoryOrCreate"}},
                        {"name": "registration", "hostPath": {"path": format!("{KUBELET_DIR}/plugins_registry"), "type": "Directory"}},
                    ],
                },
            },
        }}),
    );

    // The controller Deployment: shoal-csi's Controller service beside a
    // storage peer (it reaches the peer's admin socket on the node's data
    // dir), with the external sidecars.
    let controller_labels = json!({CLUSTER_LABEL: cluster_label(sc), "app.kubernetes.io/name": "shoal", "app.kubernetes.io/component": "csi-controller"});
    let sidecar = |name: &str, image: &str, extra: &[&str]| {
        let mut args = vec![
            "--csi-address=/csi/csi.sock".to_string(),
            "--leader-election".to_string(),
            format!("--leader-election-namespace={}", n.namespace),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        json!({
            "name": name,
            "image": image,
            "imagePullPolicy": pull,
            "args": args,
            "volumeMounts": [{"name": "socket", "mountPath": "/csi"}],
        })
    };
    b.push(
        typed::<Deployment>(),
        true,
        &n.controller,
        "csi-controller",
        json!({"spec": {
            "replicas": 2,
            "selector": {"matchLabels": controller_labels},
            "template": {
                "metadata": {"labels": controller_labels},
                "spec": {
                    "serviceAccountName": n.controller,
                    "nodeSelector": spec.nodes.node_selector,
                    "tolerations": spec.nodes.tolerations,
                    "priorityClassName": "system-cluster-critical",
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": controller_labels}},
                    }]}},
                    "containers": [
                        {
                            "name": "csi-controller",
                            "image": images.csi,
                            "imagePullPolicy": pull,
                            "args": ["--endpoint", "unix:///csi/csi.sock", "--mode", "controller", "--peer-dir", "/data"],
                            "resources": resources(&spec.resources.csi),
                            "volumeMounts": [
                                {"name": "socket", "mountPath": "/csi"},
                                {"name": "data", "mountPath": "/data"},
                            ],
                        },
                        sidecar("csi-provisioner", &images.provisioner, &["--feature-gates=Topology=true", "--extra-create-metadata", "--timeout=120s"]),
                        sidecar("csi-resizer", &images.resizer, &["--timeout=120s"]),
                        sidecar("csi-snapshotter", &images.snapshotter, &["--timeout=300s"]),
                    ],
                    "volumes": [
                        {"name": "socket", "emptyDir": {}},
                        {"name": "data", "hostPath": {"path": spec.storage.host_path, "type": "Directory"}},
                    ],
                },
            },
        }}),
    );

    // The driver, and the classes that provision with it.
    b.push(
        typed::<CSIDriver>(),
        false,
        DRIVER,
        "csi-driver",
        json!({"spec": {
            "attachRequired": false,
            "podInfoOnMount": true,
            "fsGroupPolicy": "File",
            "volumeLifecycleModes": ["Persistent"],
        }}),
    );
    for class in &spec.storage_classes {
        let mut parameters = class.parameters.clone();
        parameters
            .entry("replicas".into())
            .or_insert_with(|| spec.replication.to_string());
        let body = json!({
            "provisioner": DRIVER,
            "parameters": parameters,
            "reclaimPolicy": format!("{:?}", class.reclaim_policy),
            "allowVolumeExpansion": class.allow_volume_expansion,
            "volumeBindingMode": "Immediate",
        });
        b.push(
            typed::<StorageClass>(),
            false,
            &class.name,
            "storage-class",
            body,
        );
        if class.default {
            let last = b.out.last_mut().expect("just pushed");
            last.object
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(
                    "storageclass.kubernetes.io/is-default-class".into(),
                    "true".into(),
                );
        }
    }
    if snapshots {
        let name = format!("{}-snapshots", n.cluster_scoped);
        b.push(
            snapshot_class_resource(),
            false,
            &name,
            "snapshot-class",
            json!({"driver": DRIVER, "deletionPolicy": "Delete"}),
        );
    }
    b.out
}

/// The DaemonSet that erases the peers' data on every storage node when a
/// StorageCluster that asks for it is deleted: each pod empties the host
/// path, then reports ready.
pub fn wipe_daemonset(sc: &StorageCluster) -> Desired {
    let n = Names::of(sc);
    let labels = json!({CLUSTER_LABEL: cluster_label(sc), "app.kubernetes.io/name": "shoal", "app.kubernetes.io/component": "wipe"});
    let mut b = Builder {
        sc,
        names: n.clone(),
        labels: BTreeMap::from([(CLUSTER_LABEL.to_string(), cluster_label(sc))]),
        out: Vec::new(),
    };
    b.push(
        typed::<DaemonSet>(),
        true,
        &wipe_name(sc),
        "wipe",
        json!({"spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": sc.spec.nodes.node_selector,
                    "tolerations": sc.spec.nodes.tolerations,
                    "containers": [{
                        "name": "wipe",
                        "image": sc.spec.images.shoal,
                        "imagePullPolicy": sc.spec.images.pull_policy,
                        "command": ["/bin/sh", "-c",
                            "find /data -mindepth 1 -delete && touch /tmp/wiped && exec sleep 2147483647"],
                        "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/wiped"]}, "periodSeconds": 2},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "data", "hostPath": {"path": sc.spec.storage.host_path, "type": "DirectoryOrCreate"}}],
                },
            },
        }}),
    );
    b.out.pop().expect("just pushed")
}

/// The name of the wiping DaemonSet.
pub fn wipe_name(sc: &StorageCluster) -> String {
    format!("{}-wipe", sc.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FailureDomain, StorageClusterSpec};

    fn cluster(spec: serde_json::Value) -> StorageCluster {
        let spec: StorageClusterSpec = serde_json::from_value(spec).unwrap();
        let mut sc = StorageCluster::new("main", spec);
        sc.metadata.namespace = Some("storage".into());
        sc.metadata.uid = Some("uid-1".into());
        sc
    }

    fn find<'a>(objects: &'a [Desired], kind: &str, name: &str) -> &'a Value {
        &objects
            .iter()
            .find(|d| d.resource.kind == kind && d.name() == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .object
            .data
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let sc = cluster(json!({}));
        assert_eq!(sc.spec.replication, 3);
        assert_eq!(sc.spec.placement.failure_domain, FailureDomain::Zone);
        assert_eq!(sc.spec.placement.zone_label, "topology.kubernetes.io/zone");
        assert_eq!(sc.spec.storage.host_path, "/var/lib/shoal");
        assert_eq!(sc.spec.storage_classes[0].name, "shoal");
    }

    #[test]
    fn every_object_is_made_and_owned_or_labelled() {
        let sc = cluster(json!({
            "replication": 2,
            "placement": {"failureDomain": "rack", "rackLabel": "example.com/rack"},
            "nodes": {"nodeSelector": {"storage": "yes"}},
            "storageClasses": [
                {"name": "fast", "default": true, "parameters": {"replicas": "1"}},
                {"name": "safe", "reclaimPolicy": "Retain", "allowVolumeExpansion": false},
            ],
        }));
        let objects = desired(&sc, true);
        let kinds: Vec<(&str, String)> = objects
            .iter()
            .map(|d| (d.resource.kind.as_str(), d.name()))
            .collect();
        for (kind, name) in [
            ("ServiceAccount", "main-node"),
            ("ServiceAccount", "main-csi-controller"),
            ("ClusterRole", "shoal-storage-main-node"),
            ("ClusterRoleBinding", "shoal-storage-main-controller"),
            ("Role", "main-leader-election"),
            ("RoleBinding", "main-leader-election"),
            ("ConfigMap", "main-config"),
            ("Service", "main-peers"),
            ("DaemonSet", "main-node"),
            ("DaemonSet", "main-csi-node"),
            ("Deployment", "main-csi-controller"),
            ("CSIDriver", "csi.shoal.io"),
            ("StorageClass", "fast"),
            ("StorageClass", "safe"),
            ("VolumeSnapshotClass", "shoal-storage-main-snapshots"),
        ] {
            assert!(
                kinds.contains(&(kind, name.to_string())),
                "{kind} {name} in {kinds:?}"
            );
        }
        for d in &objects {
            let meta = &d.object.metadata;
            assert_eq!(meta.labels.as_ref().unwrap()[CLUSTER_LABEL], "storage.main");
            if d.namespaced {
                assert_eq!(meta.namespace.as_deref(), Some("storage"));
                let owner = &meta.owner_references.as_ref().unwrap()[0];
                assert_eq!(
                    (owner.kind.as_str(), owner.uid.as_str()),
                    ("StorageCluster", "uid-1")
                );
                assert_eq!(owner.controller, Some(true));
            } else {
                assert!(meta.namespace.is_none() && meta.owner_references.is_none());
            }
        }
        assert!(
            !desired(&sc, false)
                .iter()
                .any(|d| d.resource.kind == "VolumeSnapshotClass")
        );

        let config = find(&objects, "ConfigMap", "main-config");
        assert_eq!(config["data"]["REPLICATION"], "2");
        assert_eq!(config["data"]["FAILURE_DOMAIN"], "rack");
        assert_eq!(config["data"]["RACK_LABEL"], "example.com/rack");
        let fast = find(&objects, "StorageClass", "fast");
        assert_eq!(fast["parameters"]["replicas"], "1");
        let safe = find(&objects, "StorageClass", "safe");
        assert_eq!(safe["parameters"]["replicas"], "2");
        assert_eq!(safe["reclaimPolicy"], "Retain");
        assert_eq!(safe["allowVolumeExpansion"], false);
        let default = objects.iter().find(|d| d.name() == "fast").unwrap();
        assert_eq!(
            default.object.metadata.annotations.as_ref().unwrap()["storageclass.kubernetes.io/is-default-class"],
            "true"
        );
        let driver = find(&objects, "CSIDriver", "csi.shoal.io");
        assert_eq!(driver["spec"]["attachRequired"], false);

        let names = |pod: &Value| -> Vec<String> {
            pod["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        let ds = find(&objects, "DaemonSet", "main-node");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["storage"], "yes");
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(names(pod), ["peer"]);
        let peer = &pod["containers"][0];
        assert_eq!(peer["securityContext"]["privileged"], true);
        let kubelet = peer["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "kubelet")
            .unwrap();
        assert_eq!(kubelet["mountPropagation"], "Bidirectional");
        let script = peer["command"][2].as_str().unwrap();
        assert!(
            script.contains("--retry-join $(sed 's/^/--join /' /topology/join)"),
            "{script}"
        );
        assert!(
            script.contains("--fuse-keeper /data/fuse-keeper.sock"),
            "{script}"
        );
        let init = &pod["initContainers"][0];
        assert_eq!(init["args"][3], "--peers");
        assert_eq!(init["args"][4], "storage=yes");
        // The CSI node service apart, keeping the peer's FUSE connections,
        // with the upstream sidecars by default and without them when
        // asked.
        let csi = find(&objects, "DaemonSet", "main-csi-node");
        let csi_pod = &csi["spec"]["template"]["spec"];
        assert_eq!(
            names(csi_pod),
            ["csi-node", "node-driver-registrar", "livenessprobe"]
        );
        let args = csi_pod["containers"][0]["args"].to_string();
        assert!(args.contains("--fuse-keeper") && !args.contains("--registration-dir"));
        let mut builtin = sc.clone();
        builtin.spec.csi.node_sidecars = false;
        let objects = desired(&builtin, true);
        let csi_pod = &find(&objects, "DaemonSet", "main-csi-node")["spec"]["template"]["spec"];
        assert_eq!(names(csi_pod), ["csi-node"]);
        let args = csi_pod["containers"][0]["args"].to_string();
        for flag in [
            "--registration-dir",
            "--kubelet-endpoint",
            "--healthz-listen",
        ] {
            assert!(args.contains(flag), "{flag} in {args}");
        }
        // The typed form parses: the JSON is a valid DaemonSet.
        let _: DaemonSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"}, "spec": ds["spec"],
        }))
        .unwrap();
        let deploy = find(&objects, "Deployment", "main-csi-controller");
        let _: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": deploy["spec"],
        }))
        .unwrap();
    }

    #[test]
    fn the_wipe_runs_where_the_peers_ran_on_their_data() {
        let sc = cluster(json!({
            "nodes": {"nodeSelector": {"storage": "yes"}},
            "storage": {"hostPath": "/srv/shoal", "wipeOnDelete": true},
        }));
        let wipe = wipe_daemonset(&sc);
        assert_eq!(wipe.name(), "main-wipe");
        let pod = &wipe.object.data["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["storage"], "yes");
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/srv/shoal");
        assert!(
            pod["containers"][0]["command"][2]
                .as_str()
                .unwrap()
                .contains("find /data -mindepth 1 -delete")
        );
    }

    #[test]
    fn a_policy_change_changes_the_peers_pod_template() {
        let a = cluster(json!({"replication": 3}));
        let b = cluster(json!({"replication": 5}));
        let c = cluster(json!({"replication": 3, "placement": {"failureDomain": "host"}}));
        assert_ne!(config_hash(&a), config_hash(&b));
        assert_ne!(config_hash(&a), config_hash(&c));
        assert_eq!(
            config_hash(&a),
            config_hash(&cluster(json!({"replication": 3})))
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100Gi"), Some(100 << 30));
        assert_eq!(parse_quantity("1.5Ti"), Some(3 << 39));
        assert_eq!(parse_quantity("500G"), Some(500_000_000_000));
        assert_eq!(parse_quantity("12"), Some(12));
        assert_eq!(parse_quantity("12Xi"), None);
        assert_eq!(quantity(100 << 30), "100Gi");
        assert_eq!(quantity(1536 << 20), "1.5Gi");
        assert_eq!(quantity(0), "0");
    }
}
