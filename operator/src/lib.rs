//! Shoal's operator: one `StorageCluster` resource becomes a running Shoal
//! cluster (storage peers and the CSI node service on the selected nodes,
//! the CSI controller, RBAC, the CSIDriver and StorageClasses), and its
//! status shows how the peers are doing.
//!
//! - [`crd`]: the resource's types; its schema is generated from them.
//! - [`objects`]: what a StorageCluster becomes, as a pure function.
//! - [`peers`]: what the storage peers report about themselves.
//! - [`reconcile`]: the controller that applies it and reports status.

pub mod crd;
pub mod objects;
pub mod peers;
pub mod reconcile;

use kube::CustomResourceExt;

/// The CRD as YAML, as `shoal-operator crd` prints it and manifests/ and
/// the Helm chart hold it.
pub fn crd_yaml() -> String {
    serde_saphyr::to_string(&crd::StorageCluster::crd()).expect("the CRD serialises")
}
