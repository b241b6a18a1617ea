#!/usr/bin/env bash
# The cost of outlet-side enforcement (issue 12) in the `http` scenario, measured in one run:
# the build before enforcement (filter at the inlet only) and this build (filter at the inlet
# and the outlet, in both inject-at modes), in interleaved rounds. Binaries, stripped, in
# target-devbin/: postern-bench-old (commit 2601d51) and postern-bench (this tree), both release.
# Output: $OUT/http-{old,new}-<round>.{md,json} and $OUT/machine.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
rounds=${ROUNDS:-3}
args=${HTTP_ARGS:-"--requests 20000 --connections 8 --lines 50"}
{ nproc; uname -r; grep -m1 "model name" /proc/cpuinfo; free -g | head -2; } | tee "$out/machine.txt"
for r in $(seq 1 "$rounds"); do
  for v in old new; do
    bin=target-devbin/postern-bench
    [ "$v" = old ] && bin=target-devbin/postern-bench-old
    echo "== $v round $r ($(date -u +%T))"
    # shellcheck disable=SC2086
    timeout -k 5 120 "$bin" http $args --json "$out/http-$v-$r.json" > "$out/http-$v-$r.md" 2> "$out/http-$v-$r.err"
    echo "rc=$?"; cat "$out/http-$v-$r.md"
  done
done
