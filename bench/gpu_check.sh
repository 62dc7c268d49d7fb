#!/usr/bin/env bash
# Device wrapper for bench/gpu_check.py (see its header): install the carried wheels (.whl/, for diffusers) into
# /tmp/site, then run the check within an 8-minute wall clock; results land in $OUT (default ./gpu_check_out).
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
export OUT="${OUT:-./gpu_check_out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/*.whl carried: the VAE sections will fail without diffusers" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
# --budget leaves the script's own deadline 30 s inside the hard timeout, so it writes its reports itself.
timeout -s INT 480 python3 bench/gpu_check.py --out "$OUT" --budget 450 "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
