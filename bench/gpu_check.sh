#!/usr/bin/env bash
# One prepared check for a lent GPU machine (about 5 minutes; at most 8): the `gpu`
# tests, then bench/gpu_check.py's figures (GPU ceilings, prefill and decode against
# transformers on the same GPU, the GPU -> CPU KV stream between worker processes,
# the DCGM-named NVML gauges). Needs only what such a machine has: python3 with torch
# (CUDA), transformers, grpcio, protobuf, prometheus-client, nvidia-ml-py, pytest.
# Wheels for what it lacks (crc32c, grpcio-health-checking, grpcio-reflection, and
# grpcio/protobuf as new as the generated stubs) can travel in .whl/ (README, GPU).
#
#   OUT=DIR bash bench/gpu_check.sh      # DIR/gpu_check.json, DIR/gpu_tests.log
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pdserve-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pdserve-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
timeout 200 "$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 330 "$PYTHON" -m bench.gpu_check --out "$OUT" --budget-s 270
check=$?
echo "gpu tests rc=$tests, gpu_check rc=$check"
[ "$tests" -eq 0 ] && [ "$check" -eq 0 ]
