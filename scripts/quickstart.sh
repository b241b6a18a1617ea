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
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq influxdb influxdb-client >/dev/null
fi
if ! command -v protoc >/dev/null; then
  # The relay's etcd client (the relay fleet) compiles etcd's gRPC definitions with protoc.
  say "installing protoc from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq protobuf-compiler >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is needed (https://rustup.rs)" >&2
  exit 1
fi

say "building postern (release)"
cargo build --release --quiet --bins
bin=$root/target/release

rm -rf "$work"
# Private from the start (the nodes would otherwise tighten them, with a warning).
mkdir -p -m 700 "$work"
mkdir -p -m 700 "$work"/{influxdb,relay,outlet,inlet}
pids=()
cleanup() {
  if [ -z "${KEEP:-}" ]; then
    # Newest first: the outlet revokes its leases while InfluxDB is still up.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
      kill "${pids[$i]}" 2>/dev/null || true
      wait "${pids[$i]}" 2>/dev/null || true
    done
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

say "starting a private InfluxDB 1.x on 127.0.0.1:$influx_port (auth enabled: the service behind the outlet)"
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
  auth-enabled = true
  log-enabled = false
CONF
influxd -config "$work/influxdb/influxdb.conf" >"$work/influxdb/log" 2>&1 &
pids+=($!)
wait_for "InfluxDB" curl -sf "http://127.0.0.1:$influx_port/ping"
admin_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
curl -sf -XPOST "http://127.0.0.1:$influx_port/query" \
  --data-urlencode "q=CREATE USER admin WITH PASSWORD '$admin_pw' WITH ALL PRIVILEGES" >/dev/null
curl -sf -u "admin:$admin_pw" -XPOST "http://127.0.0.1:$influx_port/query" \
  --data-urlencode "q=CREATE DATABASE quickstart" >/dev/null
# The outlet's admin credential lives in a file only the outlet reads; clients never see it.
umask 077
printf 'admin:%s' "$admin_pw" >"$work/outlet/influx-admin"
umask 022

say "creating the project CA; relay policy: only role=influxdb-outlet may offer 'influxdb', only role=influxdb-client may reach it"
"$bin/postern-relay" ca init --state-dir "$work/relay" >/dev/null
cat >"$work/relay/relay.toml" <<CONF
listen = "127.0.0.1:$relay_port"
state-dir = "$work/relay"

[[policy]]
service = "influxdb"
register = 'role = "influxdb-outlet"'
route = 'role = "influxdb-client"'
CONF

say "starting the relay on udp/127.0.0.1:$relay_port"
"$bin/postern-relay" run --config "$work/relay/relay.toml" >"$work/relay/log" 2>&1 &
pids+=($!)

say "creating single-use enrollment tickets (10 minutes) for the outlet and the inlet"
outlet_ticket=$("$bin/postern-relay" ticket create --attr role=influxdb-outlet --ttl 10m \
  --relay "127.0.0.1:$relay_port" --state-dir "$work/relay")
inlet_ticket=$("$bin/postern-relay" ticket create --attr role=influxdb-client --ttl 10m \
  --relay "127.0.0.1:$relay_port" --state-dir "$work/relay")

say "starting the outlet: enrolls with its ticket, leases a short-lived InfluxDB user per inlet"
cat >"$work/outlet/outlet.toml" <<CONF
name = "outlet-1"
state-dir = "$work/outlet/state"

[influxdb-outlet]
to = "http://127.0.0.1:$influx_port"
api = "v1"
allow = 'role = "influxdb-client"'
all-access-token = "file:$work/outlet/influx-admin"
leased-token-expires-in = 300
leased-token-permissions = '[{"action":"read","resource":{"type":"buckets","name":"quickstart"}},{"action":"write","resource":{"type":"buckets","name":"quickstart"}}]'
CONF
POSTERN_TICKET=$outlet_ticket "$bin/postern-outlet" run --config "$work/outlet/outlet.toml" >"$work/outlet/log" 2>&1 &
pids+=($!)

say "starting the inlet: enrolls with its ticket; local port 127.0.0.1:$inlet_port carries the leased credential"
cat >"$work/inlet/inlet.toml" <<CONF
name = "inlet-1"
state-dir = "$work/inlet/state"

[[service]]
name = "influxdb"
listen = "127.0.0.1:$inlet_port"
kind = "influxdb"
CONF
POSTERN_TICKET=$inlet_ticket "$bin/postern-inlet" run --config "$work/inlet/inlet.toml" >"$work/inlet/log" 2>&1 &
pids+=($!)
wait_for "the tunnel and the first lease" curl -sf "http://127.0.0.1:$inlet_port/ping"

influx_cli() { influx -host 127.0.0.1 -port "$inlet_port" "$@"; }

say "through the inlet, with NO credentials: writing 3 points (curl, line protocol)"
now=$(date +%s)
printf 'cpu,host=a usage=0.64 %s\ncpu,host=b usage=0.21 %s\ncpu,host=c usage=0.97 %s\n' \
  "$now" "$now" "$now" |
  curl -sf -XPOST "http://127.0.0.1:$inlet_port/write?db=quickstart&precision=s" --data-binary @-

say "through the inlet, with NO credentials: SELECT host, usage FROM cpu (influx CLI)"
out=$(influx_cli -database quickstart -execute 'SELECT host, usage FROM cpu')
echo "$out"
count=$(grep -cE '^[0-9]+ +[abc] ' <<<"$out" || true)
if [ "$count" != 3 ]; then
  echo "expected 3 points back through the inlet, got $count" >&2
  exit 1
fi

say "the lease behind it (postern-outlet lease list), and the InfluxDB users it made"
"$bin/postern-outlet" lease list --state-dir "$work/outlet/state"
curl -sf -u "admin:$admin_pw" -XPOST "http://127.0.0.1:$influx_port/query" --data-urlencode "q=SHOW USERS"
echo

say "done: enrolled with tickets; 3 points written and read back through inlet -> relay -> outlet -> InfluxDB with a leased, per-client user"
echo "    logs and state: $work"
if [ -n "${KEEP:-}" ]; then
  echo "    still running (pids ${pids[*]}); point any InfluxDB client at 127.0.0.1:$inlet_port, no credentials needed"
fi
