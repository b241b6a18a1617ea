#!/usr/bin/env bash
# iperf3 (a client no one here wrote) through each tunnel, side by side, in one run.
#
#   bash bench/iperf3.sh [-r ROUNDS] [-t SECONDS] [-b BINDIR] [-o OUT.md] [-j OUT.json]
#
# Systems: direct TCP; postern (relay, outlet and inlet as their own release processes, the
# relay path forced with --direct never); postern-direct (the same with the direct path on, when
# POSTERN_IPERF_DIRECT=1); rathole (plain TCP and Noise) and bore when installed
# (bench/install-baselines.sh). Tests: 1 stream, 8 streams, 1 stream reverse (-R). Rounds are
# interleaved (every system once per test per round) and the table gives the median.
#
# For each run it reads, from /proc, the CPU time of the tunnel's two ends (postern: inlet +
# outlet; rathole/bore: their client) and of its middle (postern's relay, rathole's or bore's
# server), per GiB received by iperf3; iperf3's TCP retransmits; and the kernel's datagram drops
# on every UDP socket of the postern processes (`drops` of /proc/net/udp{,6}, the same figure
# as `ss -uam`'s `d`), which the relay's own metrics cannot see.
#
# Needs: iperf3 (apt-get install iperf3), python3, postern release binaries
# (cargo build --release -p postern-relay -p postern-outlet -p postern-inlet).
set -euo pipefail

rounds=3
secs=5
bin=target/release
out_md=
out_json=
while getopts "r:t:b:o:j:h" opt; do
  case $opt in
    r) rounds=$OPTARG ;;
    t) secs=$OPTARG ;;
    b) bin=$OPTARG ;;
    o) out_md=$OPTARG ;;
    j) out_json=$OPTARG ;;
    *)
      sed -n '2,20p' "$0"
      exit 2
      ;;
  esac
done

for need in iperf3 python3 "$bin/postern-relay" "$bin/postern-outlet" "$bin/postern-inlet"; do
  if ! command -v "$need" >/dev/null 2>&1 && [ ! -x "$need" ]; then
    echo "iperf3.sh: $need not found (see the header of this script)" >&2
    exit 2
  fi
done
find_bin() { command -v "$1" 2>/dev/null || { [ -x "$HOME/.cargo/bin/$1" ] && echo "$HOME/.cargo/bin/$1"; } || true; }
rathole=$(find_bin rathole)
bore=$(find_bin bore)

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
say() { printf '== %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { # addr port what
  for _ in $(seq 200); do
    if python3 -c "import socket,sys; socket.create_connection(('$1',$2),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "iperf3.sh: $3 is not listening on $1:$2" >&2
  return 1
}
# Waits until a test through the tunnel gets data to iperf3's server (the tunnel's far side may
# come up after its local port listens).
wait_through() { # port what
  for _ in $(seq 100); do
    local got
    got=$(timeout 10 iperf3 -c 127.0.0.1 -p "$1" -t 1 -J 2>/dev/null || true)
    if [[ $got == *'"sum_received"'* ]]; then return 0; fi
    sleep 0.2
  done
  echo "iperf3.sh: no iperf3 test got through $2" >&2
  return 1
}

iperf_port=$(free_port)
iperf3 -s -p "$iperf_port" >"$work/iperf3-server.log" 2>&1 &
pids+=($!)
wait_tcp 127.0.0.1 "$iperf_port" "iperf3 -s"

declare -A sys_port sys_ends sys_mid sys_udp
rss_pids=()
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
systems=(direct)
sys_port[direct]=$iperf_port

# postern: relay, outlet, inlet as separate processes, enrolled with tickets.
start_postern() { # name direct-setting [bindir [VAR=value ...]]
  local name=$1 direct=$2 d="$work/$1" bin=${3:-$bin}
  local -a envs=("${@:4}")
  mkdir -p -m 700 "$d" "$d/relay" "$d/outlet" "$d/inlet"
  local rport iport
  rport=$(free_port)
  iport=$(free_port)
  "$bin/postern-relay" ca init --state-dir "$d/relay" >/dev/null
  printf 'listen = "127.0.0.1:%s"\nstate-dir = "%s"\n[[policy]]\nservice = "iperf"\nregister = '"'"'role = "outlet"'"'"'\nroute = '"'"'role = "client"'"'"'\n' \
    "$rport" "$d/relay" >"$d/relay/relay.toml"
  env "${envs[@]}" POSTERN_LOG=warn "$bin/postern-relay" run --config "$d/relay/relay.toml" >"$d/relay/log" 2>&1 &
  local relay_pid=$!
  pids+=($relay_pid)
  wait_tcp 127.0.0.1 "$rport" "postern-relay ($name)"
  local ot it
  ot=$("$bin/postern-relay" ticket create --attr role=outlet --ttl 10m --relay "127.0.0.1:$rport" --state-dir "$d/relay")
  it=$("$bin/postern-relay" ticket create --attr role=client --ttl 10m --relay "127.0.0.1:$rport" --state-dir "$d/relay")
  env "${envs[@]}" POSTERN_LOG=warn POSTERN_TICKET=$ot "$bin/postern-outlet" run --direct "$direct" --state-dir "$d/outlet" \
    --service "iperf=127.0.0.1:$iperf_port,allow=role = \"client\"" >"$d/outlet/log" 2>&1 &
  local outlet_pid=$!
  pids+=($outlet_pid)
  env "${envs[@]}" POSTERN_LOG=warn POSTERN_TICKET=$it "$bin/postern-inlet" run --direct "$direct" --state-dir "$d/inlet" \
    --service "iperf=127.0.0.1:$iport" >"$d/inlet/log" 2>&1 &
  local inlet_pid=$!
  pids+=($inlet_pid)
  wait_tcp 127.0.0.1 "$iport" "postern-inlet ($name)"
  wait_through "$iport" "$name" || { tail -5 "$d"/*/log >&2; exit 1; }
  systems+=("$name")
  sys_port[$name]=$iport
  sys_ends[$name]="$inlet_pid $outlet_pid"
  sys_mid[$name]=$relay_pid
  sys_udp[$name]="$relay_pid $inlet_pid $outlet_pid"
  rss_pids+=("$name:inlet:$inlet_pid" "$name:outlet:$outlet_pid" "$name:relay:$relay_pid")
}

start_rathole() { # name noise(0/1)
  local name=$1 noise=$2 d="$work/$1"
  mkdir -p "$d"
  local cport pport st="" ct=""
  cport=$(free_port)
  pport=$(free_port)
  if [ "$noise" = 1 ]; then
    local keys priv pub
    keys=$("$rathole" --genkey)
    priv=$(awk '/Private Key/{getline; print; exit}' <<<"$keys" | tr -d ' ')
    pub=$(awk '/Public Key/{getline; print; exit}' <<<"$keys" | tr -d ' ')
    st=$(printf '[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "%s"\n' "$priv")
    ct=$(printf '[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "%s"\n' "$pub")
  fi
  printf '[server]\nbind_addr = "127.0.0.1:%s"\n%s\n[server.services.bench]\ntoken = "bench-token"\nbind_addr = "127.0.0.1:%s"\n' \
    "$cport" "$st" "$pport" >"$d/server.toml"
  printf '[client]\nremote_addr = "127.0.0.1:%s"\n%s\n[client.services.bench]\ntoken = "bench-token"\nlocal_addr = "127.0.0.1:%s"\n' \
    "$cport" "$ct" "$iperf_port" >"$d/client.toml"
  "$rathole" --server "$d/server.toml" >"$d/server.log" 2>&1 &
  local s=$!
  pids+=($s)
  wait_tcp 127.0.0.1 "$cport" "rathole server"
  "$rathole" --client "$d/client.toml" >"$d/client.log" 2>&1 &
  local c=$!
  pids+=($c)
  wait_tcp 127.0.0.1 "$pport" "rathole service"
  wait_through "$pport" "$name"
  systems+=("$name")
  sys_port[$name]=$pport
  sys_ends[$name]=$c
  sys_mid[$name]=$s
}

start_bore() {
  local pport
  pport=$(free_port)
  "$bore" server --bind-addr 127.0.0.1 --min-port "$pport" --max-port "$pport" >"$work/bore-server.log" 2>&1 &
  local s=$!
  pids+=($s)
  wait_tcp 127.0.0.1 7835 "bore server"
  "$bore" local "$iperf_port" --local-host 127.0.0.1 --to 127.0.0.1 --port "$pport" >"$work/bore-local.log" 2>&1 &
  local c=$!
  pids+=($c)
  wait_tcp 127.0.0.1 "$pport" "bore tunnel"
  wait_through "$pport" bore
  systems+=(bore)
  sys_port[bore]=$pport
  sys_ends[bore]=$c
  sys_mid[bore]=$s
}

say "starting postern (relay path)"
start_postern postern never
# POSTERN_IPERF_BEFORE=DIR adds "postern-before": the same set-up with the binaries in DIR (an
# earlier build), so a change is measured against its baseline in the same run.
# POSTERN_IPERF_BEFORE_ENV="VAR=value ..." sets variables for that instance's processes only.
if [ -n "${POSTERN_IPERF_BEFORE:-}" ]; then
  say "starting postern-before ($POSTERN_IPERF_BEFORE)"
  read -r -a before_env <<<"${POSTERN_IPERF_BEFORE_ENV:-}"
  start_postern postern-before never "$POSTERN_IPERF_BEFORE" "${before_env[@]}"
fi
if [ "${POSTERN_IPERF_DIRECT:-0}" = 1 ]; then
  say "starting postern (direct path on)"
  start_postern postern-direct auto
fi
# POSTERN_IPERF_ONLY=postern (a space-separated list) skips the third-party tunnels, e.g. to
# profile postern alone; POSTERN_IPERF_TESTS="1" runs only some tests.
if [ -n "${POSTERN_IPERF_ONLY:-}" ]; then rathole= bore=; fi
if [ -n "$rathole" ]; then
  say "starting rathole (plain, noise)"
  start_rathole rathole 0
  start_rathole rathole-noise 1
else
  say "rathole not installed (bench/install-baselines.sh): skipped"
fi
if [ -n "$bore" ]; then
  say "starting bore"
  start_bore
else
  say "bore not installed (bench/install-baselines.sh): skipped"
fi

# CPU ticks (utime+stime) summed over pids.
ticks() {
  local t=0 p f
  for p in "$@"; do
    f=$(sed 's/.*) //' "/proc/$p/stat")
    t=$((t + $(awk '{print $12 + $13}' <<<"$f")))
  done
  echo "$t"
}
# Kernel drops summed over every UDP socket the pids hold.
udp_drops() {
  [ $# -eq 0 ] && { echo 0; return; }
  local inodes
  inodes=$(for p in "$@"; do ls -l "/proc/$p/fd" 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\]/\1/p'; done | sort -u | tr '\n' ' ')
  awk -v list="$inodes" 'BEGIN{n=split(list,a," "); for(i=1;i<=n;i++) want[a[i]]=1}
    FNR>1 && ($10 in want) {d+=$NF} END{print d+0}' /proc/net/udp /proc/net/udp6
}

read -r -a tests <<<"${POSTERN_IPERF_TESTS:-1 8 1R}"
results="$work/results.tsv"
: >"$results"
say "running $rounds interleaved rounds of ${secs}s: ${tests[*]} × ${systems[*]}"
for r in $(seq "$rounds"); do
  for t in "${tests[@]}"; do
    for s in "${systems[@]}"; do
      args=(-c 127.0.0.1 -p "${sys_port[$s]}" -t "$secs" -J -P "${t%R}")
      [ "${t: -1}" = R ] && args+=(-R)
      # shellcheck disable=SC2086
      e0=$(ticks ${sys_ends[$s]:-}) m0=$(ticks ${sys_mid[$s]:-}) d0=$(udp_drops ${sys_udp[$s]:-})
      if ! iperf3 "${args[@]}" >"$work/run.json" 2>"$work/run.err"; then
        say "round $r $t $s: iperf3 failed: $(tail -c 300 "$work/run.json" "$work/run.err" | tr '\n' ' ')"
        printf '%s\t%s\t%s\tfail\t0\t0\t0\t0\t0\t0\n' "$r" "$t" "$s" >>"$results"
        continue
      fi
      # shellcheck disable=SC2086
      e1=$(ticks ${sys_ends[$s]:-}) m1=$(ticks ${sys_mid[$s]:-}) d1=$(udp_drops ${sys_udp[$s]:-})
      python3 - "$work/run.json" "$r" "$t" "$s" $((e1 - e0)) $((m1 - m0)) $((d1 - d0)) >>"$results" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
r, t, s, e, m, d = sys.argv[2:8]
end = j.get("end", {})
if "sum_received" not in end:
    sys.stderr.write(f"   round {r} {t} {s}: iperf3 reported no result: {j.get('error', 'no error given')}\n")
    print("\t".join([r, t, s, "fail", "0", "0", "0", "0", "0", "0"]))
    sys.exit(0)
recv = end["sum_received"]
retr = end.get("sum_sent", {}).get("retransmits", 0)
print("\t".join([r, t, s, "ok", str(recv["bits_per_second"] / 1e9), str(recv["bytes"]), e, m, str(retr), d]))
PY
      tail -1 "$results" | awk -F'\t' '$4 == "ok" {printf "   round %s %-3s %-14s %6.2f Gbit/s\n", $1, $2, $3, $5}' >&2
    done
  done
  for e in "${rss_pids[@]}"; do
    printf '%s\t%s\t%s\n' "$r" "${e%:*}" "$(rss_kib "${e##*:}")" >>"$work/rss.tsv"
  done
done

touch "$work/rss.tsv"
python3 - "$results" "$rounds" "$secs" "$out_md" "$out_json" "$work/rss.tsv" <<'PY'
import json, statistics, sys, os, platform, subprocess, datetime
path, rounds, secs, out_md, out_json, rss_path = sys.argv[1:7]
rows = {}
order = []
for line in open(path):
    f = line.rstrip("\n").split("\t")
    r, t, s, status = f[:4]
    key = (t, s)
    if key not in rows:
        rows[key] = []
        order.append(key)
    if status != "ok":
        rows[key].append(None)
        continue
    gbps, nbytes, e, m, retr, drops = float(f[4]), int(f[5]), int(f[6]), int(f[7]), int(f[8]), int(f[9])
    gib = nbytes / 2**30
    rows[key].append({"gbps": gbps, "bytes": nbytes, "ends_cpu_s_per_gib": e / 100 / gib if gib else 0,
                      "middle_cpu_s_per_gib": m / 100 / gib if gib else 0, "retransmits": retr, "udp_drops": drops})
def med(vals):
    return statistics.median(vals) if vals else float("nan")
names = {"1": "1 stream", "8": "8 streams", "1R": "1 stream reverse"}
lines = []
load = os.getloadavg()[0]
lines.append(f"iperf3 -t {secs}, {rounds} interleaved rounds, median; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"nproc {os.cpu_count()}; 1-min load at the end {load:.1f}")
lines.append("")
lines.append("| test | system | Gbit/s | runs | vs direct | ends CPU s/GiB | middle CPU s/GiB | TCP retransmits | UDP drops (kernel) |")
lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|")
summary = []
direct = {}
for (t, s) in order:
    ok = [x for x in rows[(t, s)] if x]
    g = med([x["gbps"] for x in ok])
    if s == "direct":
        direct[t] = g
for (t, s) in order:
    runs = rows[(t, s)]
    ok = [x for x in runs if x]
    g = med([x["gbps"] for x in ok])
    e = med([x["ends_cpu_s_per_gib"] for x in ok])
    m = med([x["middle_cpu_s_per_gib"] for x in ok])
    rt = med([x["retransmits"] for x in ok])
    dr = sum(x["udp_drops"] for x in ok)
    runs_s = " ".join(f"{x['gbps']:.2f}" if x else "fail" for x in runs)
    vs = g / direct[t] if direct.get(t) else float("nan")
    is_postern = s.startswith("postern")
    lines.append(f"| {names[t]} | {s} | {g:.2f} | {runs_s} | {vs:.2f} | "
                 f"{'-' if s == 'direct' else f'{e:.2f}'} | {'-' if s == 'direct' else f'{m:.2f}'} | "
                 f"{rt:.0f} | {dr if is_postern else '-'} |")
    summary.append({"test": t, "system": s, "gbps_median": g, "runs": runs, "ends_cpu_s_per_gib": e,
                    "middle_cpu_s_per_gib": m, "retransmits_median": rt, "udp_drops_total": dr if is_postern else None})
lines.append("")
lines.append("UDP drops: summed over all rounds, every UDP socket of the relay, outlet and inlet.")
rss = {}
for line in open(rss_path):
    r, who, kib = line.rstrip("\n").split("\t")
    rss.setdefault(who, []).append(int(kib))
if rss:
    lines.append("")
    lines.append("RSS after each round (MiB): " + "; ".join(
        f"{who} " + " ".join(f"{k / 1024:.1f}" for k in v) for who, v in rss.items()))
summary_rss = {who: v for who, v in rss.items()}
text = "\n".join(lines)
print(text)
if out_md:
    open(out_md, "w").write(text + "\n")
if out_json:
    json.dump({"rounds": int(rounds), "seconds": float(secs), "rows": summary, "rss_kib_after_each_round": summary_rss},
              open(out_json, "w"), indent=1)
PY
