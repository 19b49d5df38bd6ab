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
# The front-proxy tests run a real nginx, HAProxy and Caddy (Debian's packages); they fail
# when one is missing.
for proxy in nginx haproxy caddy; do
    if ! command -v "$proxy" >/dev/null && [ ! -x "/usr/sbin/$proxy" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "== installing $proxy (apt-get)" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y --no-install-recommends "$proxy" >/dev/null \
                || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$proxy" >/dev/null; }
        else
            echo "$proxy is missing: apt-get install -y $proxy (the front-proxy tests need it)" >&2
        fi
    fi
done
# The CORS test drives a real headless browser (Debian's chromium); it fails when missing.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing chromium (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y chromium >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
    else
        echo "chromium is missing: apt-get install -y chromium (the CORS browser test needs it)" >&2
    fi
fi
echo "== pytest" >&2
exec "$venv/bin/pytest" "$@"
