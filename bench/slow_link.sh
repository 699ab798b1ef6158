#!/usr/bin/env bash
# W4 with the prefill worker behind a slow link: the plan per request against both fixed plans.
#
# The prefill worker runs in a network namespace of its own, reached over a veth pair that
# `tc tbf` shapes to LINK_MBIT in both directions; the decode worker and the routers stay
# on the host. The same two workers (prefill on CPU 0, decode on CPU 1, as `pdserve up`
# places them) serve every target, one at a time:
#
#   cost-model        the default router: plan per request by predicted TTFT
#   cost-model-int8   the same, allowed to ask for int8 KV on the wire (--kv-encodings int8)
#   fixed-remote      load_aware: every prompt of 16+ tokens prefilled across the link
#   fixed-local       load_aware: every prompt prefilled on the decode worker
#
# The workers run without prefix caching: the targets send the same prompts, and a prompt
# cached by one target must not make the next one look fast. Needs root (ip netns, tc).
#
#   sudo bash bench/slow_link.sh   # LINK_MBIT=100 DURATION=90 RATE_SHORT=1 RATE_LONG=0.15
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-bench/results}
MBIT=${LINK_MBIT:-100}
DUR=${DURATION:-90}
RS=${RATE_SHORT:-1}
RL=${RATE_LONG:-0.15}
NS=pdslow HOST_IF=pdslow0 NS_IF=pdslow1 HOST_IP=10.89.0.1 NS_IP=10.89.0.2
LOGS=$(mktemp -d /tmp/pdserve-slow-link-XXXX)
mkdir -p "$OUT"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$HOST_IF" 2>/dev/null || true
}
trap cleanup EXIT

ip netns del "$NS" 2>/dev/null || true
ip link del "$HOST_IF" 2>/dev/null || true
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$NS_IF"
ip link set "$NS_IF" netns "$NS"
ip addr add "$HOST_IP/24" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$NS_IF"
ip netns exec "$NS" ip link set "$NS_IF" up
ip netns exec "$NS" ip link set lo up
tc qdisc add dev "$HOST_IF" root tbf rate "${MBIT}mbit" burst 64kb latency 50ms
ip netns exec "$NS" tc qdisc add dev "$NS_IF" root tbf rate "${MBIT}mbit" burst 64kb latency 50ms

# The link's ceiling, measured: one TCP stream from the namespace to the host.
LINK_MB_S=$($PY -m bench.link_probe --netns "$NS" --listen "$NS_IP" --python "$PY")
echo "link: tbf ${MBIT} Mbit/s, measured ${LINK_MB_S} MB/s"

start() { local name=$1; shift; "$@" >"$LOGS/$name.log" 2>&1 & pids+=($!); }
start prefill ip netns exec "$NS" $PY -m prefill_worker --host "$NS_IP" --port 50061 \
  --cpus 0 --max-num-batched-tokens 2048 --decode-step-budget-s 0 --no-enable-prefix-caching
start decode $PY -m decode_worker --port 50071 --cpus 1 --no-enable-prefix-caching \
  --prefill-allowlist "$NS_IP:50061"
router() { local name=$1 port=$2; shift 2
  start "$name" $PY -m router --port "$port" --http-port 0 --decode 127.0.0.1:50071 \
    --prefill "$NS_IP:50061" "$@"; }
router cost-model 50051
router cost-model-int8 50052 --kv-encodings int8
router fixed-remote 50053 --policy load_aware
router fixed-local 50054 --policy load_aware --local-prefill-below 1000000

$PY - <<'EOF'
from pdserve.launch import wait_serving
for port in (50051, 50052, 50053, 50054):
    wait_serving(f"127.0.0.1:{port}", 900, [])
EOF
echo "all servers up (logs in $LOGS)"

.venv/bin/pdserve bench --workload W4 --duration "$DUR" --rate-short "$RS" --rate-long "$RL" \
  --target grpc://127.0.0.1:50051 --label cost-model \
  --target grpc://127.0.0.1:50052 --label cost-model-int8 \
  --target grpc://127.0.0.1:50053 --label fixed-remote \
  --target grpc://127.0.0.1:50054 --label fixed-local \
  --json "$OUT/slow_link_${MBIT}mbit.json"
$PY -m bench.link_probe --annotate "$OUT/slow_link_${MBIT}mbit.json" --mbit "$MBIT" \
  --measured "$LINK_MB_S"
