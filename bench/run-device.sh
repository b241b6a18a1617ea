#!/usr/bin/env bash
# The bench on a lent many-core machine (see DEVELOPERS.md: `device`), where 2 cores cannot
# drive a large fleet. Binaries are built here and carried in .devbin/ (stripped):
#   .devbin/postern-bench       this tree, release
#   .devbin/postern-bench-prepool  an earlier build (for before/after rows), optional
#   .devbin/rathole, .devbin/bore  from bench/install-baselines.sh
# Every scenario has its own time limit, and results are packed after each one, so a run that
# is cut short still returns what it measured. Output: $OUT/results.tgz and $OUT/run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/bench-out}
c=$out/c
mkdir -p "$c"
export PATH=$PWD/.devbin:$PATH
ulimit -n 1048576 2>/dev/null || ulimit -n 65536
b=".devbin/postern-bench ${QUICK:+--quick}"
pack() { tar czf "$out/results.tgz" -C "$c" . 2>/dev/null; }
scen() { # name limit_s args...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))"
  timeout -k 5 "$limit" "$@" > "$c/$name.md" 2> "$c/$name.err"
  echo "rc=$? $name"; cat "$c/$name.md"; tail -3 "$c/$name.err"; pack
}
{ nproc; uname -r; grep -m1 "model name" /proc/cpuinfo; free -g | head -2; ulimit -n; } | tee "$c/machine.txt"
scen bulk 120 $b --baselines bulk --streams 1,8,64,1000 --run-timeout 20 --json "$c/bulk.json" --charts "$c"
if [ -x .devbin/postern-bench-prepool ]; then
  scen bulk-prepool 45 .devbin/postern-bench-prepool ${QUICK:+--quick} bulk --streams 1,8,64,1000 --run-timeout 20 --json "$c/bulk-prepool.json"
fi
scen rr 45 $b --baselines rr --secs 5 --json "$c/rr.json" --charts "$c"
scen open 30 $b --baselines open --json "$c/open.json"
scen http 20 $b http --json "$c/http.json"
# The fd limit there is 20,000 (not raisable): every idle stream costs 4 sockets in the bench
# process and every (inlet, service) pair a listener, so the 10,000-route fleet has no streams.
scen fleet-300 60 $b fleet --outlets 300 --inlets 10 --streams 1 --parallel 128 --json "$c/fleet-300.json"
scen fleet-1000 200 $b fleet --outlets 1000 --inlets 10 --streams 0 --parallel 256 --json "$c/fleet-1000.json"
echo "== done $(date -u +%T)"
