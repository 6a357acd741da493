#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a fresh Debian machine:
# clang headers (bindgen for RocksDB), protoc, FUSE 3, and git (the
# filesystem tests run git inside a mount). Does nothing when
# they are already there.
set -euo pipefail
packages=(libclang-dev protobuf-compiler fuse3 build-essential git)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
command -v cargo >/dev/null || { echo "install-deps: cargo is missing; install Rust (rustup) first" >&2; exit 1; }
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
