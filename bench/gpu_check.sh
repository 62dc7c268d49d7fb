#!/usr/bin/env bash
# Run bench/gpu_check.py (see its header) on a CUDA machine within an 8-minute wall clock:
#   bash bench/gpu_check.sh                  # results in ./gpu_check_out: gpu_check.json, gpu_check.md, gpu_check.log
#   OUT=/data/check bash bench/gpu_check.sh  # elsewhere
# Wheels in .whl/ (for a machine that cannot download: diffusers and Pillow) are installed into /tmp/site first.
set -u
export OUT="${OUT:-./gpu_check_out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -c "import diffusers" 2> /dev/null; then
    echo "diffusers is not installed (pip install diffusers pillow): the VAE sections will fail" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
# --budget leaves the script's own deadline 30 s inside the hard timeout, so it writes its reports itself.
timeout -s INT 480 python3 bench/gpu_check.py --out "$OUT" --budget 450 "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
