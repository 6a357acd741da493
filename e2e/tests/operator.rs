//! The operator against a real Kubernetes API server: kube-apiserver and
//! kube-controller-manager built from Debian's kubernetes source
//! (`e2e/kube/build-kubernetes.sh`) with Debian's etcd, on loopback. There
//! are no kubelets, so pods never run: the test checks what the operator
//! asks of Kubernetes (every object and its spec), how it follows edits,
//! what it reports, and that deleting the StorageCluster cleans up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const NS: &str = "shoal-system";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The API server and etcd, stopped on drop.
struct ApiServer {
    dir: tempfile::TempDir,
}

impl ApiServer {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shoal-kube-")
            .tempdir()
            .unwrap();
        let out = Command::new(repo().join("e2e/kube/start-apiserver.sh"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start-apiserver.sh failed (run e2e/kube/build-kubernetes.sh first):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_in(args, None)
    }

    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    /// Runs kubectl and insists it succeeds; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) -> Output {
        self.kubectl_in(&["apply", "-f", "-"], Some(yaml))
    }

    /// An object as JSON, if it exists.
    fn get(&self, kind: &str, name: &str, ns: Option<&str>) -> Option<Value> {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = self.kubectl(&args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// A kubeconfig that acts as ServiceAccount `name` in `ns` (with the
    /// token the controller-manager issues it).
    fn service_account_kubeconfig(&self, ns: &str, name: &str) -> PathBuf {
        let account = self
            .wait_for(
                ("serviceaccount", name, Some(ns)),
                Duration::from_secs(60),
                "a token",
                |o| o.is_some_and(|o| o["secrets"][0]["name"].is_string()),
            )
            .unwrap();
        let secret = account["secrets"][0]["name"].as_str().unwrap();
        let token = self.ok(&[
            "get",
            "secret",
            secret,
            "-n",
            ns,
            "-o",
            "go-template={{.data.token | base64decode}}",
        ]);
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::copy(self.kubeconfig(), &path).unwrap();
        let config = path.to_str().unwrap();
        for args in [
            vec![
                "config",
                "--kubeconfig",
                config,
                "set-credentials",
                name,
                "--token",
                token.trim(),
            ],
            vec![
                "config",
                "--kubeconfig",
                config,
                "set-context",
                "--current",
                "--user",
                name,
            ],
        ] {
            let out = Command::new("kubectl").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        path
    }

    /// Waits (at most `limit`) until `check` holds of the object.
    fn wait_for(
        &self,
        (kind, name, ns): (&str, &str, Option<&str>),
        limit: Duration,
        what: &str,
        check: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let object = self.get(kind, name, ns);
            if check(object.as_ref()) {
                return object;
            }
            assert!(
                Instant::now() < deadline,
                "{kind} {name}: {what} within {limit:?}: {object:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("e2e/kube/stop-apiserver.sh"))
            .arg(self.dir.path())
            .output();
    }
}

/// `shoal-operator run`, killed on drop.
struct Operator(Child);

impl Operator {
    fn start(kubeconfig: &Path, log: &Path) -> Self {
        let bin = shoal_e2e::shoal_bin().with_file_name("shoal-operator");
        let log = std::fs::File::create(log).unwrap();
        Self(
            Command::new(bin)
                .arg("run")
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CLUSTER: &str = r#"
apiVersion: shoal.io/v1alpha1
kind: StorageCluster
metadata:
  name: main
  namespace: shoal-system
spec:
  replication: 3
  nodes:
    nodeSelector:
      shoal.io/storage: "true"
  storage:
    capacity: 50Gi
  storageClasses:
    - name: shoal
      default: true
    - name: shoal-scratch
      parameters:
        replicas: "1"
"#;

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn operator_against_a_real_apiserver() {
    let api = ApiServer::start();

    // The CRD installs and is served.
    api.ok(&[
        "apply",
        "-f",
        repo().join("manifests/crd.yaml").to_str().unwrap(),
    ]);
    api.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/storageclusters.shoal.io",
    ]);
    api.ok(&["create", "namespace", NS]);

    // The schema refuses bad values, naming the field.
    for (bad, field) in [
        ("replication: 9", "spec.replication"),
        ("replication: 0", "spec.replication"),
        (
            "placement: {failureDomain: planet}",
            "spec.placement.failureDomain",
        ),
        (
            "storage: {hostPath: relative/path}",
            "spec.storage.hostPath",
        ),
        ("storage: {capacity: lots}", "spec.storage.capacity"),
        (
            "storageClasses: [{name: Bad_Name}]",
            "spec.storageClasses.name",
        ),
        (
            "storageClasses: [{name: x, reclaimPolicy: Recycle}]",
            "spec.storageClasses.reclaimPolicy",
        ),
    ] {
        let yaml = format!(
            "apiVersion: shoal.io/v1alpha1\nkind: StorageCluster\nmetadata: {{name: bad, namespace: {NS}}}\nspec: {{{bad}}}\n"
        );
        let out = api.apply(&yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(err.contains(field), "{bad}: {err}");
    }

    // The snapshot CRDs, as the external-snapshotter installs them, so the
    // operator makes a VolumeSnapshotClass.
    api.ok(&[
        "apply",
        "-f",
        repo().join("e2e/kube/snapshot-crds.yaml").to_str().unwrap(),
    ]);

    // The install bundle, for real: the operator then runs as its own
    // ServiceAccount, with only the rights the bundle grants it.
    api.ok(&[
        "apply",
        "-f",
        repo().join("manifests/install.yaml").to_str().unwrap(),
    ]);
    let kubeconfig = api.service_account_kubeconfig(NS, "shoal-operator");
    let log = api.dir.path().join("operator.log");
    let _operator = Operator::start(&kubeconfig, &log);
    assert!(api.apply(CLUSTER).status.success());

    // Every object, with the right spec.
    let ns = Some(NS);
    let limit = Duration::from_secs(60);
    let ds = api
        .wait_for(("daemonset", "main-node", ns), limit, "exists", |o| {
            o.is_some()
        })
        .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["shoal.io/storage"], "true");
    assert_eq!(pod["serviceAccountName"], "main-node");
    let peer = container(pod, "peer");
    assert_eq!(peer["securityContext"]["privileged"], true);
    assert_eq!(pod["hostNetwork"], true);
    let script = peer["command"][2].as_str().unwrap();
    assert!(script.contains("--retry-join"), "{script}");
    let mounts = peer["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/var/lib/kubelet"
                && m["mountPropagation"] == "Bidirectional")
    );
    let csi_ds = api
        .wait_for(("daemonset", "main-csi-node", ns), limit, "exists", |o| {
            o.is_some()
        })
        .unwrap();
    let csi_pod = &csi_ds["spec"]["template"]["spec"];
    let csi = container(csi_pod, "csi-node");
    assert!(csi["args"].as_array().unwrap().iter().any(|a| a == "node"));
    for sidecar in ["node-driver-registrar", "livenessprobe"] {
        container(csi_pod, sidecar);
    }
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["hostPath"]["path"] == "/var/lib/shoal")
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "main-ca")
    );
    let hash = ds["spec"]["template"]["metadata"]["annotations"]["shoal.io/config-hash"].clone();
    let owner = &ds["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str()),
        (Some("StorageCluster"), Some("main"))
    );

    let deploy = api.get("deployment", "main-csi-controller", ns).unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    for name in [
        "csi-controller",
        "csi-provisioner",
        "csi-resizer",
        "csi-snapshotter",
    ] {
        container(pod, name);
    }
    assert!(
        container(pod, "csi-provisioner")["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--leader-election")
    );
    let config = api.get("configmap", "main-config", ns).unwrap();
    assert_eq!(config["data"]["REPLICATION"], "3");
    assert_eq!(config["data"]["FAILURE_DOMAIN"], "zone");
    let service = api.get("service", "main-peers", ns).unwrap();
    assert_eq!(service["spec"]["clusterIP"], "None");
    let secret = api.get("secret", "main-ca", ns).unwrap();
    for key in ["ca.crt", "ca.key", "keyring.key"] {
        assert!(
            secret["data"][key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}"
        );
    }
    for (kind, name) in [
        ("serviceaccount", "main-node"),
        ("serviceaccount", "main-csi-controller"),
        ("role", "main-leader-election"),
        ("rolebinding", "main-leader-election"),
    ] {
        assert!(api.get(kind, name, ns).is_some(), "{kind} {name}");
    }
    for (kind, name) in [
        ("clusterrole", "shoal-shoal-system-main-node"),
        ("clusterrole", "shoal-shoal-system-main-controller"),
        ("clusterrolebinding", "shoal-shoal-system-main-node"),
        ("clusterrolebinding", "shoal-shoal-system-main-controller"),
        ("volumesnapshotclass", "shoal-shoal-system-main-snapshots"),
    ] {
        assert!(api.get(kind, name, None).is_some(), "{kind} {name}");
    }
    let driver = api.get("csidriver", "csi.shoal.io", None).unwrap();
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    let class = api.get("storageclass", "shoal", None).unwrap();
    assert_eq!(class["provisioner"], "csi.shoal.io");
    assert_eq!(class["parameters"]["replicas"], "3");
    assert_eq!(class["allowVolumeExpansion"], true);
    assert_eq!(
        class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    let scratch = api.get("storageclass", "shoal-scratch", None).unwrap();
    assert_eq!(scratch["parameters"]["replicas"], "1");

    // Status: no nodes run peers here, so the cluster is Pending, with
    // its conditions and printer columns.
    let sc = api
        .wait_for(("storagecluster", "main", ns), limit, "status", |o| {
            o.is_some_and(|o| {
                o["status"]["observedGeneration"].as_i64() == o["metadata"]["generation"].as_i64()
            })
        })
        .unwrap();
    assert_eq!(sc["status"]["phase"], "Pending");
    assert_eq!(sc["status"]["ready"], "0/0");
    let conditions: Vec<&str> = sc["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(conditions, ["Ready", "Progressing", "Degraded"]);
    assert!(
        sc["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "shoal.io/cleanup")
    );
    let table = api.ok(&["get", "shoal", "-n", NS]);
    let header = table.lines().next().unwrap();
    for column in [
        "REPLICATION",
        "FAILURE DOMAIN",
        "READY",
        "CAPACITY",
        "USED",
        "PHASE",
        "AGE",
    ] {
        assert!(header.contains(column), "{column} in {table}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("main")
            && row.contains('3')
            && row.contains("zone")
            && row.contains("Pending"),
        "{row}"
    );
    let events = api.ok(&["get", "events", "-n", NS, "-o", "json"]);
    assert!(events.contains("CACreated"), "{events}");

    // Editing replication and failure domain rolls out.
    api.ok(&[
        "patch", "storagecluster", "main", "-n", NS, "--type", "merge", "-p",
        r#"{"spec":{"replication":2,"placement":{"failureDomain":"rack"},"storageClasses":[{"name":"shoal"}]}}"#,
    ]);
    api.wait_for(("configmap", "main-config", ns), limit, "new policy", |o| {
        o.is_some_and(|o| o["data"]["REPLICATION"] == "2" && o["data"]["FAILURE_DOMAIN"] == "rack")
    });
    api.wait_for(
        ("daemonset", "main-node", ns),
        limit,
        "a new pod template",
        |o| {
            o.is_some_and(|o| {
                o["spec"]["template"]["metadata"]["annotations"]["shoal.io/config-hash"] != hash
            })
        },
    );
    api.wait_for(("storageclass", "shoal", None), limit, "replicas 2", |o| {
        o.is_some_and(|o| o["parameters"]["replicas"] == "2")
    });
    api.wait_for(
        ("storageclass", "shoal-scratch", None),
        limit,
        "removed",
        |o| o.is_none(),
    );

    // The manifests install against this server.
    for entry in ["manifests/crd.yaml", "manifests/install.yaml"]
        .into_iter()
        .map(|p| repo().join(p))
        .chain(
            std::fs::read_dir(repo().join("manifests/examples"))
                .unwrap()
                .map(|e| e.unwrap().path()),
        )
    {
        let out = api.kubectl(&["apply", "--dry-run=server", "-f", entry.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "dry-run of {}: {}",
            entry.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Deleting the StorageCluster removes what it made; the CA stays.
    api.ok(&[
        "delete",
        "storagecluster",
        "main",
        "-n",
        NS,
        "--timeout=60s",
    ]);
    for (kind, name) in [
        ("csidriver", "csi.shoal.io"),
        ("storageclass", "shoal"),
        ("clusterrole", "shoal-shoal-system-main-node"),
        ("clusterrolebinding", "shoal-shoal-system-main-controller"),
        ("volumesnapshotclass", "shoal-shoal-system-main-snapshots"),
    ] {
        api.wait_for((kind, name, None), limit, "deleted", |o| o.is_none());
    }
    for (kind, name) in [
        ("daemonset", "main-node"),
        ("deployment", "main-csi-controller"),
        ("configmap", "main-config"),
        ("service", "main-peers"),
    ] {
        api.wait_for(
            (kind, name, ns),
            Duration::from_secs(120),
            "garbage-collected",
            |o| o.is_none(),
        );
    }
    assert!(
        api.get("secret", "main-ca", ns).is_some(),
        "the CA Secret outlives the cluster"
    );

    // A cluster that asks for it has its data erased when it goes: the
    // operator runs a wipe on every storage node (none here), then drops
    // the CA Secret too.
    let scratch = CLUSTER.replace("name: main", "name: scratch").replace(
        "    capacity: 50Gi",
        "    capacity: 50Gi\n    wipeOnDelete: true",
    );
    assert!(api.apply(&scratch).status.success());
    api.wait_for(("secret", "scratch-ca", ns), limit, "made", |o| o.is_some());
    api.wait_for(("daemonset", "scratch-node", ns), limit, "made", |o| {
        o.is_some()
    });
    api.ok(&[
        "delete",
        "storagecluster",
        "scratch",
        "-n",
        NS,
        "--timeout=90s",
    ]);
    assert!(
        api.get("secret", "scratch-ca", ns).is_none(),
        "the CA Secret is erased"
    );
    api.wait_for(
        ("daemonset", "scratch-wipe", ns),
        limit,
        "cleaned up",
        |o| o.is_none(),
    );
    let events = api.ok(&["get", "events", "-n", NS, "-o", "json"]);
    assert!(events.contains("DataWiped"), "{events}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
