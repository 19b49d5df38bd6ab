#!/usr/bin/env bash
# The whole test suite: lint, types, then unit, conformance and integration tests
# (integration tests start a real Synapse on loopback). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh" test
venv="${GATEWAY_VENV:-$root/.venv}"
echo "== ruff" >&2
"$venv/bin/ruff" check gateway policies tests bench
"$venv/bin/ruff" format --check gateway policies tests bench
echo "== mypy --strict gateway/" >&2
"$venv/bin/mypy" --strict gateway
echo "== pytest" >&2
exec "$venv/bin/pytest" "$@"
