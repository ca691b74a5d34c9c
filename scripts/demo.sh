#!/usr/bin/env bash
# The demo: svcproxy programs a private network namespace from examples/manifests, and requests from a pod
# and from an outside host reach real backends through the ClusterIPs. Ctrl-C removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the demo creates network namespaces and programs netfilter: run as root (sudo $0)" >&2
  exit 1
fi
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --bin svcproxy --example demo
exec ./target/release/examples/demo "$@"
