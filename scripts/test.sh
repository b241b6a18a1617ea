#!/usr/bin/env bash
# Runs postern's test suite. Installs what the tests need first (InfluxDB 1.x and its CLI from
# Debian, a Python venv with the real InfluxDB client libraries, headless Chromium, certutil and
# nginx for the browser and PROXY protocol tests, iproute2 for the network namespace of the TLS/TCP fallback test,
# etcd and protoc for the relay fleet),
# then fmt, clippy and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
need=()
command -v influxd >/dev/null || need+=(influxdb)
command -v influx >/dev/null || need+=(influxdb-client)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)
command -v certutil >/dev/null || need+=(libnss3-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
# `ip netns` and `ip rule ... ipproto` for the UDP-blocked namespace of tests/fallback_netns.rs.
command -v ip >/dev/null || need+=(iproute2)
# nftables for the NAT lab of tests/direct_netns.rs (tests/lab/natlab.sh).
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
# conntrack for the lab's NAT rebinding (`natlab.sh rebind` deletes the old mapping).
command -v conntrack >/dev/null || [ -x /usr/sbin/conntrack ] || need+=(conntrack)
# A three-member etcd cluster on loopback for tests/fleet.rs (the relay fleet's shared state),
# and protoc, which the etcd client's build needs for etcd's gRPC definitions.
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null
fi

venv=$root/.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import influxdb, influxdb_client' 2>/dev/null; then
  echo "==> creating $venv with the influxdb and influxdb-client libraries"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check influxdb influxdb-client
fi
export POSTERN_PYTHON=$venv/bin/python

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build --bins (tests/operations.rs runs the real binaries)"
cargo build --workspace --bins --locked
echo "==> cargo test"
cargo test --workspace --locked

# Coverage-guided fuzzing (fuzz/README.md): a short run of every target, from its committed seed
# corpus (new inputs go to a scratch directory). cargo fuzz needs nightly flags; a stable
# toolchain takes them with RUSTC_BOOTSTRAP=1. Longer runs: see the README's Tests section.
if ! command -v cargo-fuzz >/dev/null; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked -q || true
fi
if command -v cargo-fuzz >/dev/null; then
  echo "==> cargo fuzz (${POSTERN_FUZZ_SECONDS:-10} s per target)"
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  (
    cd fuzz
    export RUSTC_BOOTSTRAP=1
    cargo fuzz build -O -s none
    for target in $(cargo fuzz list); do
      mkdir -p "$scratch/$target" "corpus/$target"
      echo "--> $target"
      if ! cargo fuzz run -O -s none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="${POSTERN_FUZZ_SECONDS:-10}" -max_len=8192 >"$scratch/$target.log" 2>&1; then
        tail -n 40 "$scratch/$target.log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
      fi
      grep -E '^Done' "$scratch/$target.log" || true
    done
  )
else
  echo "==> SKIPPED cargo fuzz: cargo-fuzz is not installed and could not be installed (no crates.io?)"
fi
