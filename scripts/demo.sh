#!/usr/bin/env bash
# Runs the demo: a local Synapse (installed into the project's virtual environment)
# with the gateway in front of it. Extra arguments go to `gateway demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh" demo
venv="${GATEWAY_VENV:-$root/.venv}"
exec "$venv/bin/gateway" demo "$@"
