#!/usr/bin/env bash
# The one place that sets up the project's virtual environment; .ci/run and run_demo.sh both call it, so either
# reuses what the other installed.
#   bash .ci/setup_venv.sh                  # strict (CI): any failed install is an error
#   bash .ci/setup_venv.sh --best-effort    # run_demo.sh: offline, keep going with whatever is importable
# What it makes: .venv (plain `python3 -m venv`, system packages not visible, so the tests see only what is
# installed here) holding torch==2.13.0 (the CPU build; never an unpinned torch) and the project, editable, with
# its test and train extras. The stamp .venv/.hdm-setup holds a hash of pyproject.toml and of this script: while
# it matches and the imports work, nothing is installed again (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="torch==2.13.0"
VENV=.venv
best_effort=false
[ "${1:-}" = "--best-effort" ] && best_effort=true

say() { echo "[setup_venv] $*" >&2; }
stamp_now=$(cat pyproject.toml .ci/setup_venv.sh | sha256sum | cut -d' ' -f1)
# Prints the torch version when torch imports and the other packages are installed.
imports_ok() { "$VENV/bin/python" -c "
import importlib.util, sys, torch
missing = [m for m in ('transformers', 'diffusers', 'safetensors', 'numpy', 'PIL', 'hdm_core')
           if importlib.util.find_spec(m) is None]
print('torch', torch.__version__)
sys.exit(bool(missing))" 2>/dev/null; }

if [ -f "$VENV/.hdm-setup" ] && [ "$(cat "$VENV/.hdm-setup")" = "$stamp_now" ] && version=$(imports_ok); then
    say "$VENV is up to date ($version)"
    exit 0
fi

if ! "$VENV/bin/python" -c "" 2>/dev/null; then
    python3 -c "import sys; sys.exit(sys.version_info < (3, 10))" \
        || { say "python3 is $(python3 --version 2>&1); HDM needs Python >= 3.10"; exit 1; }
    say "creating $VENV"
    python3 -m venv --clear "$VENV"
elif grep -qi "^include-system-site-packages *= *true" "$VENV/pyvenv.cfg" 2>/dev/null; then
    say "note: $VENV sees the system packages (made by an older run_demo.sh); keeping it. Delete $VENV to rebuild it"
fi

install() { "$VENV/bin/python" -m pip install -q "$@"; }
complete=true
install --upgrade pip || say "could not upgrade pip; continuing with $("$VENV/bin/python" -m pip --version)"
if ! install "$TORCH"; then
    $best_effort || { say "could not install $TORCH"; exit 1; }
    say "could not install $TORCH (offline?); continuing with the torch that is importable"
    complete=false
fi
if ! install -e ".[test,train]"; then
    $best_effort || { say "'pip install -e .[test,train]' failed"; exit 1; }
    say "'pip install -e .[test,train]' failed (offline?); installing the package without dependencies"
    install --no-deps -e . || say "could not install the package either; running it from the checkout"
    complete=false
fi

if ! version=$(imports_ok); then
    say "torch / transformers / diffusers / safetensors / numpy / pillow are not importable in $VENV; install them"
    exit 1
fi
if $complete; then
    echo "$stamp_now" > "$VENV/.hdm-setup"
fi
say "$VENV ready ($version)"
