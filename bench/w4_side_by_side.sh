#!/usr/bin/env bash
# W4 side by side in one run on this machine, then the `vllm bench serve` cross-check.
#
#   colocated              decode worker prefilling itself, 2 threads, 4,096-token steps
#   colocated-chunked-512  the same with chunked prefill, 512-token steps (both without the
#                          decode workers' default step budget, --decode-step-budget-s 0)
#   disaggregated          `pdserve up --launcher process`: prefill on CPU 0, decode on CPU 1,
#                          the default router (cost model: plan per request by predicted TTFT)
#   fixed-remote           the same workers behind a load_aware router: every prompt of 16+
#                          tokens prefilled on the prefill worker
#   fixed-local            the same workers behind a load_aware router that prefills every
#                          prompt on the decode worker
#   vllm-serve             vLLM's OpenAI server on both CPUs
#
# Every server runs without prefix caching (vLLM's included): each target gets the same
# prompts, and disaggregated, fixed-remote and fixed-local share their workers, so a prompt
# cached while one target ran would make the next look fast. W4's prompts share no prefix,
# so within a target the cache changes nothing.
#
# All the servers are up at once and idle while another one is measured. Then the
# disaggregated router's HTTP endpoint gets W4's mix from `vllm bench serve`, and
# `pdserve bench`'s client replays the same requests at the same offsets
# (bench/vllm_crosscheck.py); their TTFT and ITL medians are compared.
#
#   bash bench/w4_side_by_side.sh            # DURATION=120 RATE_SHORT=0.5 OUT=bench/results
#
# Pick RATE_SHORT below what every target sustains (short output tokens/s = 128 x
# RATE_SHORT), or the run measures queues rather than interference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VPY=${PDSERVE_VLLM_PYTHON:-/work/vllm-venv/bin/python}
OUT=${OUT:-bench/results}
DUR=${DURATION:-120}
RS=${RATE_SHORT:-0.5}
MD=$($PY -c "from pdserve.model_files import resolve_model; print(resolve_model(None, convert=False))")
LOGS=$(mktemp -d /tmp/pdserve-w4-XXXX)
mkdir -p "$OUT"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

start() { local name=$1; shift; "$@" >"$LOGS/$name.log" 2>&1 & pids+=($!); }
start disagg .venv/bin/pdserve up --launcher process --no-enable-prefix-caching
start colo-d $PY -m decode_worker --port 50072 --threads 2 --max-num-batched-tokens 4096 \
  --decode-step-budget-s 0 --no-enable-prefix-caching
start colo-r $PY -m router --port 50052 --http-port 0 --decode 127.0.0.1:50072
start chunk-d $PY -m decode_worker --port 50073 --threads 2 --max-num-batched-tokens 512 \
  --decode-step-budget-s 0 --no-enable-prefix-caching
start chunk-r $PY -m router --port 50053 --http-port 0 --decode 127.0.0.1:50073
start remote-r $PY -m router --port 50054 --http-port 0 --decode 127.0.0.1:50071 \
  --prefill 127.0.0.1:50061 --policy load_aware
start local-r $PY -m router --port 50055 --http-port 0 --decode 127.0.0.1:50071 \
  --prefill 127.0.0.1:50061 --policy load_aware --local-prefill-below 1000000
VLLM_CPU_OMP_THREADS_BIND=0,1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \
  start vllm "$VPY" -m vllm.entrypoints.openai.api_server --model "$MD" --dtype bfloat16 \
  --max-model-len 4096 --no-enable-prefix-caching --port 8100

$PY - <<'EOF'
from pdserve.launch import wait_serving
for port in (50051, 50052, 50053, 50054, 50055):
    wait_serving(f"127.0.0.1:{port}", 900, [])
EOF
until curl -sf http://127.0.0.1:8100/v1/models >/dev/null; do sleep 5; done
echo "all servers up (logs in $LOGS); CPU while they idle:"
top -b -n 2 -d 10 | awk '/^top -/{n++} n==2' | sed -n 1,15p

# One core's prefill capacity: W3 on the disaggregated cluster (its prefill worker is one core).
.venv/bin/pdserve bench --target grpc://127.0.0.1:50051 --workload W3 --repeats 1 \
  --json "$OUT/w4_capacity_w3.json"
CAP=$($PY -c "import json; d = json.load(open('$OUT/w4_capacity_w3.json')); \
print(d['targets'][0]['workloads']['W3']['summary']['prefill_tok_s'])")
RL=$($PY -c "from bench.serving_bench import long_rate_for; print(long_rate_for($CAP, 0.4))")
echo "prefill capacity $CAP tok/s -> long rate $RL/s"

.venv/bin/pdserve bench --workload W4 --duration "$DUR" --rate-short "$RS" --rate-long "$RL" \
  --target grpc://127.0.0.1:50052 --label colocated \
  --target grpc://127.0.0.1:50053 --label colocated-chunked-512 \
  --target grpc://127.0.0.1:50051 --label disaggregated \
  --target grpc://127.0.0.1:50054 --label fixed-remote \
  --target grpc://127.0.0.1:50055 --label fixed-local \
  --target http://127.0.0.1:8100/v1 --label vllm-serve \
  --json "$OUT/w4_interference.json" --plot-dir "$OUT/w4_plots"

# Cross-check: vllm bench serve drives the disaggregated router's HTTP API with W4's
# mix, then pdserve bench's client replays the same requests at the same offsets.
CMD=$($PY -m bench.vllm_crosscheck dataset --tokenizer "$MD" --rate-short "$RS" --rate-long "$RL" \
  --duration "$DUR" --out "$LOGS/w4_mix.jsonl" --model-name "$(basename "$MD")" --vllm-python "$VPY")
eval "$CMD --result-dir $LOGS"
cp "$LOGS/vllm_w4.json" "$OUT/w4_crosscheck_vllm.json"
$PY -m bench.vllm_crosscheck replay --target http://127.0.0.1:8000/v1 --tokenizer "$MD" \
  --dataset "$LOGS/w4_mix.jsonl" --vllm "$LOGS/vllm_w4.json" --json "$OUT/w4_crosscheck.json"
