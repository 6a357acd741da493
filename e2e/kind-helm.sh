#!/usr/bin/env bash
# The user path of docs/kubernetes.md on a throw-away kind cluster: helm
# install, a StorageCluster, a PVC with a pod, a ReadWriteMany claim with
# two pods, an edit of the StorageCluster, and deletion. Needs kind, helm,
# kubectl and a container engine (none of which exist on the CI machines),
# and images of shoal, shoal-csi and shoal-operator built from this tree:
#   e2e/kind-helm.sh            # builds the images with docker, then runs
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in kind helm kubectl docker; do
  command -v "$tool" >/dev/null || { echo "kind-helm.sh needs $tool" >&2; exit 2; }
done

CLUSTER=shoal-e2e
TAG=e2e
NS=shoal-system

cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Waits (bounded) until "$@" succeeds.
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 5
  done
  echo "timed out waiting for $what" >&2
  exit 1
}

echo "== images"
for image in shoal:node shoal-csi:csi-driver shoal-operator:operator; do
  name=${image%%:*}; dir=${image##*:}
  docker build -q -f "$dir/Dockerfile" -t "ghcr.io/shoal-storage/$name:$TAG" .
done

echo "== kind cluster: one control plane, three workers in three zones"
cat <<KIND | kind create cluster --name "$CLUSTER" --config -
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {topology.kubernetes.io/zone: z1, shoal.io/storage: "true"}
  - role: worker
    labels: {topology.kubernetes.io/zone: z2, shoal.io/storage: "true"}
  - role: worker
    labels: {topology.kubernetes.io/zone: z3, shoal.io/storage: "true"}
KIND
for name in shoal shoal-csi shoal-operator; do
  kind load docker-image --name "$CLUSTER" "ghcr.io/shoal-storage/$name:$TAG"
done

echo "== helm install"
helm install shoal charts/shoal --namespace "$NS" --create-namespace \
  --set image.tag="$TAG" --wait

echo "== StorageCluster"
sed "s/capacity: 200Gi/capacity: 2Gi/" manifests/examples/storagecluster.yaml \
  | kubectl apply -f -
kubectl -n "$NS" patch shoal shoal --type merge -p "{\"spec\":{\"images\":{
  \"shoal\":\"ghcr.io/shoal-storage/shoal:$TAG\",
  \"csi\":\"ghcr.io/shoal-storage/shoal-csi:$TAG\",
  \"operator\":\"ghcr.io/shoal-storage/shoal-operator:$TAG\"}}}"
wait_for "StorageCluster Ready" \
  sh -c "kubectl -n $NS get shoal shoal -o jsonpath='{.status.phase}' | grep -qx Ready"
kubectl -n "$NS" get shoal

echo "== a PVC and a pod"
kubectl apply -f manifests/examples/pvc-pod.yaml
wait_for "the writer pod" kubectl wait --for=condition=Ready pod/writer --timeout=5s
wait_for "data in the volume" kubectl exec writer -- test -s /data/log

echo "== a ReadWriteMany claim shared by two pods"
kubectl apply -f manifests/examples/rwx-pvc.yaml
wait_for "both pods" kubectl wait --for=condition=Ready pod/shared-a pod/shared-b --timeout=5s
wait_for "a's writes seen by b" kubectl exec shared-b -- test -s /shared/a.log

echo "== editing the StorageCluster rolls the peers"
kubectl -n "$NS" patch shoal shoal --type merge -p '{"spec":{"replication":2}}'
wait_for "the new replication in the ConfigMap" \
  sh -c "kubectl -n $NS get configmap shoal-config -o jsonpath='{.data.REPLICATION}' | grep -qx 2"
kubectl -n "$NS" rollout status daemonset/shoal-node --timeout=600s
kubectl exec writer -- tail -n 3 /data/log

echo "== deleting the StorageCluster removes what it made"
kubectl delete -f manifests/examples/rwx-pvc.yaml -f manifests/examples/pvc-pod.yaml --wait
kubectl -n "$NS" delete shoal shoal --wait
wait_for "the CSIDriver to go" sh -c "! kubectl get csidriver csi.shoal.io"
echo "kind-helm: the user path works"
