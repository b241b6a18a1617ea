#!/usr/bin/env bash
# Runs every scenario (with the baselines that are installed) in release and writes the
# figures for bench/RESULTS.md: tables on stdout, JSON and PNG charts in bench/charts/.
# Usage: bench/run-results.sh [extra postern-bench global flags]
# The bench shares the machine's cores with whatever else runs: it first waits (up to
# QUIET_WAIT_S seconds) for the 1-minute load average to drop below QUIET_LOAD.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/charts
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release -p postern-bench
bin="$CARGO_TARGET_DIR/release/postern-bench"

wait_quiet() {
  local limit="${QUIET_LOAD:-1.5}" left="${QUIET_WAIT_S:-300}"
  while (( left > 0 )); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$limit" 'BEGIN{exit !(l < m)}'; then return 0; fi
    echo "load $load >= $limit, waiting ($left s left)" >&2
    sleep 10; left=$((left - 10))
  done
  echo "machine still busy (load $(cut -d' ' -f1 /proc/loadavg)); running anyway" >&2
}

run() {
  local name=$1; shift
  wait_quiet
  echo "== $name: load $(cut -d' ' -f1 /proc/loadavg) before" >&2
  "$bin" "$@" --json "$out/$name.json" --charts "$out" | tee "$out/$name.md"
}

run bulk --baselines "$@" bulk --streams 1,8,64,1000
run rr --baselines "$@" rr
run open --baselines "$@" open
run http "$@" http
run fleet "$@" fleet --outlets 10,50,100 --inlets 10
