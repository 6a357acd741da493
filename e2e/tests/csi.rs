//! The CSI driver against a real cluster: a real `shoal-csi` process on a
//! real unix socket, three real peers, real FUSE mounts at the target
//! paths. Kubelet cannot run here, so the tests play its part (making pod
//! directories and calling the Node service as kubelet would); their names
//! say so.
//!
//! The checks follow what the community's csi-sanity suite asks of a
//! driver, and go further: content through the mounts, snapshots restored
//! byte for byte without copying chunks, and restarts of the driver and
//! of the peer under a live writer.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_e2e::csi::{CsiDriver, KEEPER_ARGS, keeper_socket, mount_capability};
use shoal_e2e::{TestCluster, is_mounted, spread};
use shoal_proto::csi_v1::controller_client::ControllerClient;
use shoal_proto::csi_v1::node_client::NodeClient;
use shoal_proto::csi_v1::volume_capability::access_mode::Mode;
use shoal_proto::csi_v1::volume_capability::{AccessType, BlockVolume};
use shoal_proto::csi_v1::volume_content_source::{SnapshotSource, VolumeSource};
use shoal_proto::csi_v1::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MIB: i64 = 1 << 20;

fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn rwx() -> VolumeCapability {
    mount_capability(Mode::MultiNodeMultiWriter, &[])
}

fn range(required: i64, limit: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn create_request(name: &str, size: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![rwx()],
        ..Default::default()
    }
}

fn from_snapshot(id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    })
}

fn from_volume(id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    })
}

async fn create(
    ctl: &mut ControllerClient<Channel>,
    request: CreateVolumeRequest,
) -> Result<Volume, Status> {
    Ok(ctl
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .expect("a volume"))
}

/// What kubelet does before NodePublishVolume: the pod's volume directory
/// exists, the target path itself does not.
fn kubelet_target(root: &Path, pod: &str, pv: &str) -> PathBuf {
    let dir = root
        .join("kubelet/pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi")
        .join(pv);
    fs::create_dir_all(&dir).unwrap();
    dir.join("mount")
}

/// Where kubelet stages `volume` on the node whose pods' target `target`
/// is: `<kubelet>/plugins/kubernetes.io/csi/pv/<volume>/globalmount`.
fn staging(target: &Path, volume: &str) -> PathBuf {
    let kubelet = target
        .ancestors()
        .find(|a| a.ends_with("kubelet"))
        .expect("a kubelet target");
    kubelet
        .join("plugins/kubernetes.io/csi/pv")
        .join(volume)
        .join("globalmount")
}

fn publish_request(volume: &str, target: &Path, cap: VolumeCapability) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        staging_target_path: staging(target, volume).display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn stage_request(volume: &str, target: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging(target, volume).display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// NodeStageVolume, as kubelet calls it before a node's first pod of a
/// volume starts.
async fn stage(node: &mut NodeClient<Channel>, volume: &str, target: &Path, cap: VolumeCapability) {
    node.node_stage_volume(stage_request(volume, target, cap))
        .await
        .unwrap();
}

/// NodeUnstageVolume, as kubelet calls it after the node's last pod of a
/// volume went.
async fn unstage(node: &mut NodeClient<Channel>, volume: &str, target: &Path) {
    let staged = staging(target, volume);
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staged.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!is_mounted(&staged) && !staged.exists());
}

async fn unpublish(node: &mut NodeClient<Channel>, volume: &str, target: &Path) {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
}

/// Creates a volume from `source` and publishes it at `target`, as the
/// provisioner and kubelet would.
async fn provision(
    (ctl, node): (&mut ControllerClient<Channel>, &mut NodeClient<Channel>),
    mut request: CreateVolumeRequest,
    source: Option<VolumeContentSource>,
    target: PathBuf,
) -> PathBuf {
    request.volume_content_source = source.clone();
    let volume = create(ctl, request).await.unwrap();
    assert_eq!(volume.content_source, source);
    stage(node, &volume.volume_id, &target, rwx()).await;
    node.node_publish_volume(publish_request(&volume.volume_id, &target, rwx()))
        .await
        .unwrap();
    target
}

/// blake3 of every file under `dir`, by relative path.
fn digest(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(
                    rel,
                    blake3::hash(&fs::read(&path).unwrap()).to_hex().to_string(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A small tree: nested directories, a symlink, and a few MiB of data.
fn fill(dir: &Path) {
    fs::create_dir_all(dir.join("a/b")).unwrap();
    for i in 0..40 {
        fs::write(dir.join(format!("a/small-{i}")), format!("file {i}\n")).unwrap();
    }
    let big: Vec<u8> = (0..5 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(dir.join("a/b/big"), &big).unwrap();
    std::os::unix::fs::symlink("b/big", dir.join("a/link")).unwrap();
}

async fn total_blocks(cluster: &TestCluster) -> usize {
    let mut n = 0;
    for i in 0..cluster.peers.len() {
        n += cluster.local_blocks(i).await.unwrap().len();
    }
    n
}

/// Polls `check` every 200 ms for up to `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_conformance_with_mocked_kubelet() {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    let root = cluster.root().to_path_buf();
    let csi = CsiDriver::start(&cluster.peers[0].dir, &root.join("csi/csi.sock"), "node-0")
        .await
        .unwrap();
    let (mut id, mut ctl, mut node) = (csi.identity(), csi.controller(), csi.node());

    // Identity.
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.shoal.io");
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let caps = format!("{caps:?}");
    for wanted in [
        "Service(Service { r#type: ControllerService })",
        "Service(Service { r#type: VolumeAccessibilityConstraints })",
        "VolumeExpansion(VolumeExpansion { r#type: Online })",
    ] {
        assert!(caps.contains(wanted), "{wanted} in {caps}");
    }
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    // Capabilities and node info.
    let ctl_caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(ctl_caps.len(), 10, "{ctl_caps:?}");
    let node_caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(node_caps.len(), 5, "{node_caps:?}");
    assert!(format!("{node_caps:?}").contains("StageUnstageVolume"));
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-0");
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(segments["topology.shoal.io/zone"], "zone-0");
    assert_eq!(segments["topology.shoal.io/rack"], "rack-0");

    // CreateVolume: bad requests, each with the specification's code.
    type Edit = Box<dyn Fn(&mut CreateVolumeRequest)>;
    let param = |k: &'static str, v: &'static str| -> Edit {
        Box::new(move |r| {
            r.parameters = [(k.to_string(), v.to_string())].into();
        })
    };
    let cases: Vec<(Edit, Code)> = vec![
        (Box::new(|r| r.name.clear()), Code::InvalidArgument),
        (
            Box::new(|r| r.volume_capabilities.clear()),
            Code::InvalidArgument,
        ),
        (
            Box::new(|r| {
                r.volume_capabilities[0].access_type = Some(AccessType::Block(BlockVolume {}))
            }),
            Code::InvalidArgument,
        ),
        (
            Box::new(|r| r.volume_capabilities = vec![mount_capability(Mode::Unknown, &[])]),
            Code::InvalidArgument,
        ),
        (
            Box::new(|r| r.capacity_range = range(-1, 0)),
            Code::InvalidArgument,
        ),
        (
            Box::new(|r| r.capacity_range = range(10 * MIB, MIB)),
            Code::OutOfRange,
        ),
        (param("colour", "blue"), Code::InvalidArgument),
        (param("replicas", "9"), Code::InvalidArgument),
        (param("failureDomain", "planet"), Code::InvalidArgument),
        (param("replicas", "4"), Code::InvalidArgument),
        (
            Box::new(|r| {
                r.accessibility_requirements = Some(TopologyRequirement {
                    requisite: vec![Topology {
                        segments: [("topology.shoal.io/zone".to_string(), "mars".to_string())]
                            .into(),
                    }],
                    preferred: vec![],
                })
            }),
            Code::ResourceExhausted,
        ),
        (
            Box::new(|r| r.volume_content_source = from_snapshot("no-such-snapshot")),
            Code::NotFound,
        ),
        (
            Box::new(|r| r.volume_content_source = from_volume("no-such-volume")),
            Code::NotFound,
        ),
    ];
    let bad = cases.into_iter().map(|(edit, code)| {
        let mut request = create_request("v", MIB);
        edit(&mut request);
        (request, code)
    });
    for (request, want) in bad {
        let shown = format!("{request:?}");
        assert_eq!(code(create(&mut ctl, request).await), want, "{shown}");
    }
    assert!(
        ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "v".into(),
            volume_capabilities: vec![rwx()],
            ..Default::default()
        })
        .await
        .is_err_and(|s| s.code() == Code::NotFound),
        "a refused CreateVolume left volume v behind"
    );

    // CreateVolume: placed in a zone, parameters honoured, idempotent.
    let request = CreateVolumeRequest {
        parameters: [
            ("replicas".to_string(), "3".to_string()),
            ("failureDomain".to_string(), "zone".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]
        .into(),
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![Topology {
                segments: [("topology.shoal.io/zone".to_string(), "zone-1".to_string())].into(),
            }],
            preferred: vec![],
        }),
        ..create_request("pvc-alpha", 64 * MIB)
    };
    let alpha = create(&mut ctl, request.clone()).await.unwrap();
    assert_eq!(alpha.volume_id, "pvc-alpha");
    assert_eq!(alpha.capacity_bytes, 64 * MIB);
    assert_eq!(alpha.volume_context["replicas"], "3");
    assert_eq!(alpha.accessible_topology.len(), 3, "{alpha:?}");
    assert_eq!(create(&mut ctl, request.clone()).await.unwrap(), alpha);
    // The same name with an incompatible size or replication.
    assert_eq!(
        code(create(&mut ctl, create_request("pvc-alpha", 128 * MIB)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            create(
                &mut ctl,
                CreateVolumeRequest {
                    parameters: [("replicas".to_string(), "2".to_string())].into(),
                    ..create_request("pvc-alpha", 64 * MIB)
                }
            )
            .await
        ),
        Code::AlreadyExists
    );
    // A name Shoal cannot use as is maps to a stable id.
    let odd = create(&mut ctl, create_request("Odd Name/1", MIB))
        .await
        .unwrap();
    assert!(odd.volume_id.starts_with("vol-"), "{odd:?}");
    assert_eq!(
        create(&mut ctl, create_request("Odd Name/1", MIB))
            .await
            .unwrap(),
        odd
    );
    // Concurrent creates of one name: one runs, the rest are ABORTED,
    // and one volume exists.
    let results = futures::future::join_all((0..4).map(|_| {
        let mut ctl = ctl.clone();
        async move { create(&mut ctl, create_request("pvc-race", 8 * MIB)).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let aborted = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::Aborted))
        .count();
    assert!(ok >= 1 && aborted >= 1 && ok + aborted == 4, "{results:?}");

    // ValidateVolumeCapabilities.
    let v = ctl
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-alpha".into(),
            volume_capabilities: vec![rwx(), mount_capability(Mode::SingleNodeWriter, &[])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.confirmed.unwrap().volume_capabilities.len(), 2);
    let v = ctl
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-alpha".into(),
            volume_capabilities: vec![VolumeCapability {
                access_type: Some(AccessType::Block(BlockVolume {})),
                ..rwx()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.confirmed.is_none() && v.message.contains("block"),
        "{v:?}"
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-alpha".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // ListVolumes, a page at a time.
    for i in 0..3 {
        create(&mut ctl, create_request(&format!("pvc-list-{i}"), MIB))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..20 {
        let page = ctl
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        for e in &page.entries {
            let status = e.status.as_ref().unwrap();
            assert!(!status.volume_condition.as_ref().unwrap().abnormal);
            seen.push(e.volume.as_ref().unwrap().volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "every volume once, in order");
    for name in [
        "pvc-alpha",
        "pvc-race",
        "pvc-list-0",
        "pvc-list-2",
        &odd.volume_id,
    ] {
        assert!(seen.iter().any(|s| s == name), "{name} in {seen:?}");
    }
    assert_eq!(
        code(
            ctl.list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "not a token!".into(),
            })
            .await
        ),
        Code::Aborted
    );

    // GetCapacity, whole cluster and per segment.
    let capacity = |topology: Option<(&str, &str)>| {
        let mut ctl = ctl.clone();
        let request = GetCapacityRequest {
            volume_capabilities: vec![rwx()],
            accessible_topology: topology.map(|(k, v)| Topology {
                segments: [(k.to_string(), v.to_string())].into(),
            }),
            ..Default::default()
        };
        async move {
            ctl.get_capacity(request)
                .await
                .unwrap()
                .into_inner()
                .available_capacity
        }
    };
    let all = capacity(None).await;
    let zone = capacity(Some(("topology.shoal.io/zone", "zone-0"))).await;
    assert!(all > 0 && zone > 0 && zone < all, "{all} {zone}");
    assert_eq!(capacity(Some(("topology.shoal.io/zone", "mars"))).await, 0);

    // ControllerGetVolume, and the attach step Shoal does not have.
    let got = ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-alpha".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            ctl.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-missing".into(),
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: "pvc-alpha".into(),
                node_id: "node-0".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Unimplemented
    );

    // NodeStageVolume: bad requests, then the volume staged once for the
    // node, idempotently.
    let target = kubelet_target(&root, "pod-1", "pvc-alpha");
    let bad_stage: Vec<(NodeStageVolumeRequest, Code)> = vec![
        (
            NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..stage_request("pvc-alpha", &target, rwx())
            },
            Code::InvalidArgument,
        ),
        (
            NodeStageVolumeRequest {
                staging_target_path: "relative/globalmount".into(),
                ..stage_request("pvc-alpha", &target, rwx())
            },
            Code::InvalidArgument,
        ),
        (
            stage_request(
                "pvc-alpha",
                &target,
                VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    ..rwx()
                },
            ),
            Code::InvalidArgument,
        ),
        (stage_request("pvc-missing", &target, rwx()), Code::NotFound),
    ];
    for (request, want) in bad_stage {
        let shown = format!("{request:?}");
        assert_eq!(code(node.node_stage_volume(request).await), want, "{shown}");
    }
    stage(&mut node, "pvc-alpha", &target, rwx()).await;
    stage(&mut node, "pvc-alpha", &target, rwx()).await;
    assert!(is_mounted(&staging(&target, "pvc-alpha")));
    // Staged again with other settings: refused.
    assert_eq!(
        code(
            node.node_stage_volume(stage_request(
                "pvc-alpha",
                &target,
                mount_capability(Mode::MultiNodeMultiWriter, &["sync"])
            ))
            .await
        ),
        Code::AlreadyExists
    );

    // NodePublishVolume: bad requests.
    let bad_publish: Vec<(NodePublishVolumeRequest, Code)> = vec![
        (
            NodePublishVolumeRequest {
                volume_id: String::new(),
                ..publish_request("pvc-alpha", &target, rwx())
            },
            Code::InvalidArgument,
        ),
        (
            NodePublishVolumeRequest {
                target_path: String::new(),
                ..publish_request("pvc-alpha", &target, rwx())
            },
            Code::InvalidArgument,
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: None,
                ..publish_request("pvc-alpha", &target, rwx())
            },
            Code::InvalidArgument,
        ),
        (
            publish_request(
                "pvc-alpha",
                &target,
                VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    ..rwx()
                },
            ),
            Code::InvalidArgument,
        ),
        (
            publish_request(
                "pvc-alpha",
                &target,
                mount_capability(Mode::MultiNodeMultiWriter, &["nosuid", "frobnicate"]),
            ),
            Code::InvalidArgument,
        ),
        (
            publish_request("pvc-missing", &target, rwx()),
            Code::NotFound,
        ),
    ];
    for (request, want) in bad_publish {
        let shown = format!("{request:?}");
        assert_eq!(
            code(node.node_publish_volume(request).await),
            want,
            "{shown}"
        );
        assert!(!is_mounted(&target), "{shown} left a mount");
    }

    // NodePublishVolume: a writable mount with flags, idempotent.
    let publish = publish_request(
        "pvc-alpha",
        &target,
        mount_capability(Mode::MultiNodeMultiWriter, &["noexec", "nosuid"]),
    );
    node.node_publish_volume(publish.clone()).await.unwrap();
    node.node_publish_volume(publish.clone()).await.unwrap();
    assert!(is_mounted(&target));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(target.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("noexec") && line.contains("nosuid"), "{line}");
    fill(&target);
    let alpha_tree = digest(&target);
    assert_eq!(alpha_tree.len(), 42);
    // Another volume at the same target, or the same one with other
    // settings, is refused.
    let race_1 = kubelet_target(&root, "pod-4", "pvc-race");
    let sw = mount_capability(Mode::SingleNodeWriter, &[]);
    stage(&mut node, "pvc-race", &race_1, sw.clone()).await;
    assert_eq!(
        code(
            node.node_publish_volume(publish_request("pvc-race", &target, rwx()))
                .await
        ),
        Code::AlreadyExists
    );
    // Read-only: by flag and by access mode.
    let ro_target = kubelet_target(&root, "pod-2", "pvc-alpha");
    node.node_publish_volume(NodePublishVolumeRequest {
        readonly: true,
        ..publish_request("pvc-alpha", &ro_target, rwx())
    })
    .await
    .unwrap();
    let err = fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        digest(&ro_target),
        alpha_tree,
        "both mounts see the same files"
    );
    let ro2 = kubelet_target(&root, "pod-3", "pvc-alpha");
    node.node_publish_volume(publish_request(
        "pvc-alpha",
        &ro2,
        mount_capability(Mode::MultiNodeReaderOnly, &[]),
    ))
    .await
    .unwrap();
    assert_eq!(
        fs::write(ro2.join("nope"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // A single-node-writer volume takes one target per node.
    let race_2 = kubelet_target(&root, "pod-5", "pvc-race");
    node.node_publish_volume(publish_request("pvc-race", &race_1, sw.clone()))
        .await
        .unwrap();
    assert_eq!(
        code(
            node.node_publish_volume(publish_request("pvc-race", &race_2, sw))
                .await
        ),
        Code::FailedPrecondition
    );

    // NodeGetVolumeStats: bytes and inodes after the writes.
    let stats = |path: &Path| {
        let mut node = node.clone();
        let request = NodeGetVolumeStatsRequest {
            volume_id: "pvc-alpha".into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        };
        async move { node.node_get_volume_stats(request).await }
    };
    eventually(
        Duration::from_secs(20),
        "usage to show in stats",
        async || {
            let s = stats(&target).await.unwrap().into_inner();
            let bytes = s
                .usage
                .iter()
                .find(|u| u.unit == volume_usage::Unit::Bytes as i32);
            let inodes = s
                .usage
                .iter()
                .find(|u| u.unit == volume_usage::Unit::Inodes as i32);
            bytes.is_some_and(|b| {
                b.total == 64 * MIB && b.used >= 5 * MIB && b.available <= 59 * MIB
            }) && inodes.is_some_and(|i| i.used >= 42)
                && !s.volume_condition.unwrap().abnormal
        },
    )
    .await;
    assert_eq!(code(stats(&root.join("elsewhere")).await), Code::NotFound);
    assert_eq!(
        code(
            node.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "pvc-alpha".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // Expansion, online: the mount's statfs shows the new size.
    let expanded = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-alpha".into(),
            capacity_range: range(128 * MIB, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    assert!(!expanded.node_expansion_required);
    eventually(
        Duration::from_secs(20),
        "statfs to show the new size",
        async || {
            let s = nix::sys::statvfs::statvfs(&target).unwrap();
            s.blocks() as i64 * s.fragment_size() as i64 == 128 * MIB
        },
    )
    .await;
    let node_expanded = node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-alpha".into(),
            volume_path: target.display().to_string(),
            capacity_range: range(128 * MIB, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_expanded.capacity_bytes, 128 * MIB);
    // Asking for less is done already; a limit below the size is not.
    let smaller = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-alpha".into(),
            capacity_range: range(MIB, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(smaller.capacity_bytes, 128 * MIB);
    for (request, want) in [
        (
            ControllerExpandVolumeRequest {
                volume_id: "pvc-alpha".into(),
                capacity_range: range(0, MIB),
                ..Default::default()
            },
            Code::OutOfRange,
        ),
        (
            ControllerExpandVolumeRequest {
                volume_id: "pvc-alpha".into(),
                capacity_range: None,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            ControllerExpandVolumeRequest {
                volume_id: "pvc-missing".into(),
                capacity_range: range(MIB, 0),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        assert_eq!(code(ctl.controller_expand_volume(request).await), want);
    }

    // Snapshots: no chunk is copied, so the peers' stores barely grow.
    let before = total_blocks(&cluster).await;
    let snapshot = ctl
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-alpha".into(),
            name: "snapshot-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let grown = total_blocks(&cluster).await - before;
    assert!(
        grown < 15,
        "a snapshot of 5 MiB in 5 chunks (15 replicas) added {grown} blocks"
    );
    assert!(snapshot.ready_to_use);
    assert_eq!(snapshot.snapshot_id, "snapshot-1");
    assert_eq!(snapshot.source_volume_id, "pvc-alpha");
    assert!(snapshot.size_bytes >= 5 * MIB, "{snapshot:?}");
    assert!(snapshot.creation_time.is_some());
    let again = ctl
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-alpha".into(),
            name: "snapshot-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again, snapshot, "CreateSnapshot is idempotent");
    for (source, name, want) in [
        ("pvc-race", "snapshot-1", Code::AlreadyExists),
        ("pvc-missing", "snapshot-2", Code::NotFound),
        ("pvc-alpha", "", Code::InvalidArgument),
        ("", "snapshot-3", Code::InvalidArgument),
    ] {
        let request = CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        };
        assert_eq!(code(ctl.create_snapshot(request).await), want, "{name}");
    }
    ctl.create_snapshot(CreateSnapshotRequest {
        source_volume_id: "pvc-race".into(),
        name: "snapshot-race".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let list = |request: ListSnapshotsRequest| {
        let mut ctl = ctl.clone();
        async move {
            ctl.list_snapshots(request)
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(ListSnapshotsRequest::default()).await,
        ["snapshot-1", "snapshot-race"]
    );
    for (source, id, want) in [
        ("pvc-race", "", &["snapshot-race"][..]),
        ("", "snapshot-1", &["snapshot-1"]),
        ("", "snapshot-none", &[]),
    ] {
        let request = ListSnapshotsRequest {
            source_volume_id: source.into(),
            snapshot_id: id.into(),
            ..Default::default()
        };
        assert_eq!(list(request).await, want, "{source} {id}");
    }
    let first = ctl
        .list_snapshots(ListSnapshotsRequest {
            max_entries: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 1);
    assert_eq!(first.next_token, "snapshot-race");

    // The source changes after the snapshot; the snapshot does not.
    fs::write(target.join("a/small-0"), b"changed after the snapshot\n").unwrap();
    fs::remove_file(target.join("a/small-1")).unwrap();
    fs::write(target.join("after"), b"new").unwrap();

    // Restore into a new volume: the tree as it was, byte for byte.
    assert_eq!(
        code(
            create(
                &mut ctl,
                CreateVolumeRequest {
                    volume_content_source: from_snapshot("snapshot-1"),
                    ..create_request("pvc-too-small", MIB)
                }
            )
            .await
        ),
        Code::OutOfRange
    );
    let restored_target = provision(
        (&mut ctl, &mut node),
        create_request("pvc-restored", 64 * MIB),
        from_snapshot("snapshot-1"),
        kubelet_target(&root, "pod-6", "pvc-restored"),
    )
    .await;
    assert_eq!(digest(&restored_target), alpha_tree);
    assert_eq!(
        fs::read_link(restored_target.join("a/link")).unwrap(),
        Path::new("b/big")
    );
    // Writes to the restored volume stay there.
    fs::write(restored_target.join("a/small-5"), b"restored copy\n").unwrap();
    fs::create_dir(restored_target.join("fresh")).unwrap();
    assert_eq!(fs::read(target.join("a/small-5")).unwrap(), b"file 5\n");
    assert!(!target.join("fresh").exists());

    // Clone: the source as it is now.
    let clone_target = provision(
        (&mut ctl, &mut node),
        create_request("pvc-clone", 128 * MIB),
        from_volume("pvc-alpha"),
        kubelet_target(&root, "pod-7", "pvc-clone"),
    )
    .await;
    assert_eq!(digest(&clone_target), digest(&target));

    // Deleting the source keeps what the snapshot and volumes made from it
    // share; deleting the last of them frees it.
    for t in [&target, &ro_target, &ro2] {
        unpublish(&mut node, "pvc-alpha", t).await;
        assert!(!is_mounted(t) && !t.exists(), "{} still there", t.display());
    }
    unpublish(&mut node, "pvc-alpha", &target).await;
    unstage(&mut node, "pvc-alpha", &target).await;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-alpha".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let big = fs::read(restored_target.join("a/b/big")).unwrap();
    assert_eq!(big.len(), 5 * MIB as usize);
    let with_lineage = total_blocks(&cluster).await;
    for (volume, t) in [
        ("pvc-restored", &restored_target),
        ("pvc-clone", &clone_target),
    ] {
        unpublish(&mut node, volume, t).await;
        unstage(&mut node, volume, t).await;
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        total_blocks(&cluster).await,
        with_lineage,
        "the snapshot still holds the chunks"
    );
    ctl.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "snapshot-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let freed = with_lineage - total_blocks(&cluster).await;
    assert!(
        freed >= 15,
        "deleting the last of the lineage freed {freed} blocks"
    );

    // Deletes are idempotent; ids Shoal never issued are already gone.
    for volume_id in ["pvc-alpha", "pvc-never", "Not A Volume"] {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for snapshot_id in ["snapshot-1", "snapshot-never"] {
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot_id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        code(ctl.delete_volume(DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.delete_snapshot(DeleteSnapshotRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: "pvc-race".into(),
                target_path: String::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    unpublish(&mut node, "pvc-race", &race_1).await;
    unstage(&mut node, "pvc-race", &race_1).await;
    let listed: HashMap<String, i64> = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| {
            let v = e.volume.unwrap();
            (v.volume_id, v.capacity_bytes)
        })
        .collect();
    assert!(!listed.contains_key("pvc-alpha") && listed.contains_key("pvc-race"));
}

/// What an appender saw: for every line it tried, whether the append and
/// its fsync succeeded, and the longest any one of them took.
#[derive(Debug, Default)]
struct Appended {
    ok: Vec<bool>,
    errors: Vec<String>,
    longest: Duration,
}

/// Appends numbered lines to `path`, fsync'ing each, every 5 ms until
/// `stop` (at most 10,000 lines, about a minute).
fn appender(
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Appended> {
    std::thread::spawn(move || {
        let mut seen = Appended::default();
        for i in 0..10_000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let started = Instant::now();
            let result = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .and_then(|mut f| {
                    f.write_all(format!("line {i}\n").as_bytes())?;
                    f.sync_all()
                });
            seen.longest = seen.longest.max(started.elapsed());
            seen.ok.push(result.is_ok());
            if let Err(e) = result {
                seen.errors.push(format!("append {i}: {e}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    })
}

/// Every line whose fsync succeeded is in `log`, in order, and nothing
/// else is but lines whose fsync failed.
fn check_log(log: &str, seen: &Appended) {
    let lines: Vec<usize> = log
        .lines()
        .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    let mut sorted = lines.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(lines, sorted, "lines out of order or twice");
    for (i, ok) in seen.ok.iter().enumerate() {
        if *ok {
            assert!(
                lines.binary_search(&i).is_ok(),
                "line {i} was fsynced and is lost"
            );
        }
    }
    assert!(lines.iter().all(|&i| i < seen.ok.len()));
}

/// A cluster whose peers hand their FUSE connections to the keeper of the
/// shoal-csi beside them, as in Kubernetes, with a volume staged and
/// published on peer 0's node.
async fn kept_volume(volume: &str) -> (TestCluster, CsiDriver, PathBuf) {
    let cluster = TestCluster::start_with(&spread(3, 3), 3, KEEPER_ARGS)
        .await
        .unwrap();
    let root = cluster.root().to_path_buf();
    let csi = CsiDriver::start(&cluster.peers[0].dir, &root.join("csi.sock"), "node-0")
        .await
        .unwrap();
    create(&mut csi.controller(), create_request(volume, 64 * MIB))
        .await
        .unwrap();
    let target = kubelet_target(&root, "pod-1", volume);
    let mut node = csi.node();
    stage(&mut node, volume, &target, rwx()).await;
    node.node_publish_volume(publish_request(volume, &target, rwx()))
        .await
        .unwrap();
    // The peer has handed the staging mount's connection to the keeper.
    let keeper = keeper_socket(&cluster.peers[0].dir);
    let staged = staging(&target, volume);
    eventually(
        Duration::from_secs(30),
        "the keeper to hold the mount",
        async || {
            shoal_keeper::Client::connect(&keeper)
                .and_then(|c| c.list())
                .is_ok_and(|l| l.iter().any(|(e, _)| Path::new(&e.key) == staged))
        },
    )
    .await;
    (cluster, csi, target)
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_restart_keeps_published_volumes_with_mocked_kubelet() {
    let (mut cluster, mut csi, target) = kept_volume("pvc-log").await;

    // A writer appends through the target path while shoal-csi (and the
    // keeper in it) is killed with SIGKILL and started again: the peer
    // holds the connection meanwhile, and hands it to the new keeper.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = appender(target.join("log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    csi.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(is_mounted(&target), "the mount outlives shoal-csi");
    csi.restart().await.unwrap();
    let keeper = keeper_socket(&cluster.peers[0].dir);
    eventually(
        Duration::from_secs(30),
        "the peer to refill the new keeper",
        async || {
            shoal_keeper::Client::connect(&keeper)
                .and_then(|c| c.list())
                .is_ok_and(|l| !l.is_empty())
        },
    )
    .await;

    // Then the peer restarts (SIGTERM): the new keeper carries the mount.
    cluster.stop(0, Duration::from_secs(60)).await.unwrap();
    cluster.restart(0).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "appends after the restart",
        async || fs::read_to_string(target.join("log")).is_ok_and(|l| l.lines().count() > 300),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = writer.join().unwrap();
    assert!(seen.errors.is_empty(), "failed writes: {:?}", seen.errors);
    check_log(&fs::read_to_string(target.join("log")).unwrap(), &seen);
    println!(
        "{} appends, longest append+fsync {:.2} s across a restart of shoal-csi and of the peer",
        seen.ok.len(),
        seen.longest.as_secs_f64()
    );

    // The restarted driver still serves the volume.
    let stats = csi
        .node()
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-log".into(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    unpublish(&mut csi.node(), "pvc-log", &target).await;
    unstage(&mut csi.node(), "pvc-log", &target).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_peer_leaves_its_mounts_to_the_next_with_mocked_kubelet() {
    let (mut cluster, csi, target) = kept_volume("pvc-db").await;
    let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 253) as u8).collect();
    {
        let mut f = fs::File::create(target.join("table")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }

    // SIGKILL the peer that serves the mount, under a writer: the kernel
    // mount stays (the keeper holds it), requests wait for the next peer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = appender(target.join("log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill(0);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(0).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the table readable again",
        async || fs::read(target.join("table")).is_ok_and(|d| d == data),
    )
    .await;
    println!(
        "the mount answered again {:.1} s after its peer was killed",
        killed.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = writer.join().unwrap();
    // A peer that dies cannot vouch for what it acknowledged and had not
    // committed: at most the append in flight fails, with EIO.
    assert!(seen.errors.len() <= 1, "failed writes: {:?}", seen.errors);
    for e in &seen.errors {
        assert!(e.contains("Input/output error"), "{e}");
    }
    check_log(&fs::read_to_string(target.join("log")).unwrap(), &seen);
    fs::write(target.join("after-restart"), b"ok").unwrap();
    assert_eq!(fs::read(target.join("after-restart")).unwrap(), b"ok");

    // Unpublished and unstaged volumes do not come back.
    let mut node = csi.node();
    unpublish(&mut node, "pvc-db", &target).await;
    unstage(&mut node, "pvc-db", &target).await;
    cluster.kill(0);
    cluster.restart(0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let staged = staging(&target, "pvc-db");
    assert!(!is_mounted(&staged) && !staged.exists());
}
