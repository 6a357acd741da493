//! Shoal operator. The `StorageCluster` CRD and its reconciler arrive with the operator work (issue 6); this crate holds nothing yet.
