#!/usr/bin/env bash
# Installs what svcproxy needs on a Debian machine: the netfilter and iproute2 tools it drives, a C toolchain
# for the few crates that build C, and Rust when cargo is missing.
set -euo pipefail

need=()
for pair in iptables:iptables nft:nftables conntrack:conntrack ip:iproute2 cc:gcc curl:curl; do
  cmd=${pair%%:*} pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" ca-certificates >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "installing Rust (rustup, stable)"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
fi
