#!/usr/bin/env bash
# postern quickstart: a relay, an outlet next to a local InfluxDB and an inlet, all on this
# machine; then an unmodified InfluxDB client writes and queries through the inlet.
#
#   ./scripts/quickstart.sh            # run it (installs InfluxDB 1.x from Debian if missing)
#   KEEP=1 ./scripts/quickstart.sh     # leave everything running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${POSTERN_QUICKSTART_DIR:-$root/.quickstart}
relay_port=${RELAY_PORT:-14433}
influx_port=${INFLUX_PORT:-18087}
influx_rpc_port=${INFLUX_RPC_PORT:-18088}
inlet_port=${INLET_PORT:-18086}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if ! command -v influxd >/dev/null || ! command -v influx >/dev/null; then
  say "installing InfluxDB 1.x and its CLI from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq influxdb influxdb-client >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is needed (https://rustup.rs)" >&2
  exit 1
fi

say "building postern (release)"
cargo build --release --quiet --bins
bin=$root/target/release

rm -rf "$work"
mkdir -p "$work"/{influxdb,relay,outlet,inlet}
pids=()
cleanup() {
  if [ -z "${KEEP:-}" ]; then
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
}
trap cleanup EXIT

wait_for() { # wait_for DESCRIPTION COMMAND...
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $what; logs are in $work" >&2
  exit 1
}

say "starting a private InfluxDB on 127.0.0.1:$influx_port (the service behind the outlet)"
cat >"$work/influxdb/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$influx_rpc_port"
[meta]
  dir = "$work/influxdb/meta"
[data]
  dir = "$work/influxdb/data"
  wal-dir = "$work/influxdb/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$influx_port"
  log-enabled = false
CONF
influxd -config "$work/influxdb/influxdb.conf" >"$work/influxdb/log" 2>&1 &
pids+=($!)
wait_for "InfluxDB" curl -sf "http://127.0.0.1:$influx_port/ping"

say "creating the project CA and node certificates"
"$bin/postern-relay" ca init --state-dir "$work/relay" >/dev/null
"$bin/postern-relay" ca issue outlet-1 --state-dir "$work/relay" --out-dir "$work/outlet" >/dev/null
"$bin/postern-relay" ca issue inlet-1 --state-dir "$work/relay" --out-dir "$work/inlet" >/dev/null

say "starting the relay on udp/127.0.0.1:$relay_port"
"$bin/postern-relay" run --listen "127.0.0.1:$relay_port" --state-dir "$work/relay" >"$work/relay/log" 2>&1 &
pids+=($!)

say "starting the outlet (dials out to the relay; serves 'influxdb' -> 127.0.0.1:$influx_port)"
cat >"$work/outlet/outlet.toml" <<CONF
relay = "127.0.0.1:$relay_port"
cert = "$work/outlet/outlet-1.pem"
key = "$work/outlet/outlet-1.key"
ca = "$work/outlet/ca.pem"
state-dir = "$work/outlet/state"

[[service]]
name = "influxdb"
to = "127.0.0.1:$influx_port"
CONF
"$bin/postern-outlet" run --config "$work/outlet/outlet.toml" >"$work/outlet/log" 2>&1 &
pids+=($!)

say "starting the inlet (local port 127.0.0.1:$inlet_port -> service 'influxdb')"
cat >"$work/inlet/inlet.toml" <<CONF
relay = "127.0.0.1:$relay_port"
cert = "$work/inlet/inlet-1.pem"
key = "$work/inlet/inlet-1.key"
ca = "$work/inlet/ca.pem"

[[service]]
name = "influxdb"
listen = "127.0.0.1:$inlet_port"
CONF
"$bin/postern-inlet" run --config "$work/inlet/inlet.toml" >"$work/inlet/log" 2>&1 &
pids+=($!)
wait_for "the tunnel" curl -sf "http://127.0.0.1:$inlet_port/ping"

influx_cli() { influx -host 127.0.0.1 -port "$inlet_port" "$@"; }

say "through the inlet: CREATE DATABASE quickstart (influx CLI)"
influx_cli -execute 'CREATE DATABASE quickstart'

say "through the inlet: writing 3 points (HTTP /write, line protocol)"
now=$(date +%s)
printf 'cpu,host=a usage=0.64 %s\ncpu,host=b usage=0.21 %s\ncpu,host=c usage=0.97 %s\n' \
  "$now" "$now" "$now" |
  curl -sf -XPOST "http://127.0.0.1:$inlet_port/write?db=quickstart&precision=s" --data-binary @-

say "through the inlet: SELECT * FROM cpu (influx CLI)"
out=$(influx_cli -database quickstart -execute 'SELECT host, usage FROM cpu')
echo "$out"
count=$(grep -cE '^[0-9]+ +[abc] ' <<<"$out" || true)
if [ "$count" != 3 ]; then
  echo "expected 3 points back through the inlet, got $count" >&2
  exit 1
fi

say "done: 3 points written and read back through inlet -> relay -> outlet -> InfluxDB"
echo "    logs and state: $work"
if [ -n "${KEEP:-}" ]; then
  echo "    still running (pids ${pids[*]}); point any InfluxDB client at 127.0.0.1:$inlet_port"
fi
