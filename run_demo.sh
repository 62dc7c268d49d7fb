#!/usr/bin/env bash
# The main job on a fresh CPU-only machine: install into .venv, train a tiny HDM on generated shapes with the
# bundled launcher (a few minutes on 2 cores), export it in the released single-file layout and write
# demo_out/grid.png (prompt following) and demo_out/camera_strip.png (x shift -0.5..0.5, zoom 0.75..1.33).
#   bash run_demo.sh                    # train the recipe's 600 steps (2 min on 2 idle cores, 5 on busy ones)
#   bash run_demo.sh --pretrained       # no training: the shipped demo/pretrained/hdm-demo.safetensors (< 1 min)
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

# The same .venv as .ci/run (one setup script); offline it keeps going with whatever is importable.
bash .ci/setup_venv.sh --best-effort
. .venv/bin/activate
installed=$(date +%s)
echo "[run_demo] environment ready in $((installed - start)) s ($(python -c 'import torch; print("torch", torch.__version__)'))"

# Any python -m demo.run option passes through (--pretrained, --steps N, --out DIR); its exit status is kept
# (1 when the trained model's figures are near chance).
status=0
python -m demo.run --out demo_out "$@" || status=$?
echo "[run_demo] total wall time $(( $(date +%s) - start )) s"
exit $status
