#!/usr/bin/env bash
# Installs the third-party tunnels postern-bench compares against (`--baselines`), from
# crates.io, into ~/.cargo/bin. Optional: the bench skips any that are missing.
#   rathole  (server + client, plain TCP and Noise transports)
#   bore     (bore-cli: `bore server` + `bore local`)
# rathole 0.5.0's lock file pins `time` 0.3.29, which newer compilers reject; when the locked
# install fails, it is retried with fresh (semver-compatible) dependency versions.
set -euo pipefail
jobs="${CARGO_BUILD_JOBS:-2}"
for crate in rathole bore-cli; do
  echo "installing $crate" >&2
  cargo install --locked --jobs "$jobs" "$crate" ||
    cargo install --jobs "$jobs" "$crate"
done
