#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs
# matrix-gateway into it with the extras given as arguments (default: test).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GATEWAY_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="${1:-test}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "matrix-gateway needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi

stamp="$venv/.matrix-gateway-$extras"
wanted="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "installing matrix-gateway[$extras] into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 \
        | grep -v 'is ignored' >&2 || true
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[$extras]" 2>&1 \
        | grep -v 'is ignored' >&2 || true
    "$venv/bin/python" -c 'import gateway' # fails loudly if the install did not work
    echo "$wanted" > "$stamp"
fi
