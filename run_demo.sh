#!/usr/bin/env bash
# The main job on a fresh CPU-only machine: install into .venv, train a tiny HDM on generated shapes with the
# bundled launcher (a few minutes on 2 cores), export it in the released single-file layout and write
# demo_out/grid.png (prompt following) and demo_out/camera_strip.png (x shift -0.5..0.5, zoom 0.75..1.33).
#   bash run_demo.sh                    # the default budget
#   bash run_demo.sh --minutes 5        # any python -m demo.run option is passed through
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

if [ ! -x .venv/bin/python ]; then
    # System packages stay visible (a preinstalled torch or diffusers is reused, not downloaded again).
    python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
if ! python -m pip install -q torch==2.13.0; then        # the CPU build; never an unpinned torch
    echo "run_demo.sh: could not install torch==2.13.0; continuing with the torch that is importable" >&2
fi
if ! python -m pip install -q -e ".[train]"; then
    echo "run_demo.sh: 'pip install -e .[train]' failed (offline?); installing the package without dependencies" >&2
    python -m pip install -q --no-deps -e .
fi
python -c "import torch, transformers, safetensors, numpy, PIL" || {
    echo "run_demo.sh: torch / transformers / safetensors / numpy / pillow are not importable; install them" >&2
    exit 1
}
installed=$(date +%s)
echo "[run_demo] environment ready in $((installed - start)) s ($(python -c 'import torch; print("torch", torch.__version__)'))"

python -m demo.run --out demo_out "$@"
echo "[run_demo] total wall time $(( $(date +%s) - start )) s"
