#!/usr/bin/env bash
# Speculative decoding on a disaggregated decode worker, after a KV import: two clusters
# from `pdserve up --launcher process` (prefill on CPU 0, decode on CPU 1), one plain and
# one whose decode worker speculates (n-gram, 4 drafts, 2- to 4-grams), both routing every
# prompt to the prefill worker (load_aware, local_prefill_below 1) without prefix caching;
# bench/spec_served.py sends them the same W6 prompts.
#
#   bash bench/spec_served.sh      # OUT=bench/results
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-bench/results}
DIR=$(mktemp -d /tmp/pdserve-spec-XXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

cluster() {  # name, port offset, extra YAML
  cat >"$DIR/$1.yaml" <<EOF
launcher: process
http_port: 0
router_port: $((50051 + $2))
policy: load_aware
local_prefill_below: 1
enable_prefix_caching: false
prefill:
  - {port: $((50061 + $2)), metrics_port: $((9061 + $2)), cpus: [0], threads: 1}
decode:
  - {port: $((50071 + $2)), metrics_port: $((9071 + $2)), cpus: [1], threads: 1}
$3
EOF
  .venv/bin/pdserve up --config "$DIR/$1.yaml" >"$DIR/$1.log" 2>&1 &
  pids+=($!)
}
cluster plain 0 ""
cluster spec 100 "speculative_config: {method: ngram, num_speculative_tokens: 4, prompt_lookup_min: 2, prompt_lookup_max: 4}"
$PY - <<'EOF'
from pdserve.launch import wait_serving
for port in (50051, 50151):
    wait_serving(f"127.0.0.1:{port}", 900, [])
EOF
$PY -m bench.spec_served --plain 127.0.0.1:50051 --spec 127.0.0.1:50151 \
  --json "$OUT/w6_speculative_served.json"
curl -s http://127.0.0.1:9171/metrics | grep '^pdserve:spec_decode' || true
