#!/usr/bin/env bash
# Runs every test: pure unit and property tests, the fake-API-server tests and the real-kernel tests, which
# create their own network namespaces and therefore need root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the real-kernel tests create network namespaces and program netfilter: run as root (sudo $0)" >&2
  exit 1
fi
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --workspace --all-targets --no-fail-fast "$@"
