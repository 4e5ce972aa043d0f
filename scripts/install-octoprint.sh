#!/usr/bin/env bash
# Install OctoPrint 1.11 into its own virtual environment, .octoprint-venv/ in the repository root.
# OctoPrint cannot share netqueues' environment: it pins psutil<7, zeroconf<0.137 and Click<8.3.
# Idempotent: a quick no-op when a matching OctoPrint is already installed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OCTOPRINT_VENV:-$root/.octoprint-venv}"
spec="OctoPrint>=1.11,<1.12"
python="${PYTHON:-python3.11}"

installed_ok() {
    [ -x "$venv/bin/octoprint" ] && "$venv/bin/python" - <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
major, minor = (int(p) for p in version("OctoPrint").split(".")[:2])
sys.exit(0 if (major, minor) == (1, 11) else 1)
PY
}

if installed_ok; then
    echo "OctoPrint $("$venv/bin/python" -c 'from importlib.metadata import version; print(version("OctoPrint"))') already in $venv"
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    python=python3
fi
echo "Creating $venv with $("$python" --version)"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$spec"
installed_ok || { echo "OctoPrint install in $venv failed the version check" >&2; exit 1; }
echo "Installed OctoPrint $("$venv/bin/python" -c 'from importlib.metadata import version; print(version("OctoPrint"))') in $venv"
