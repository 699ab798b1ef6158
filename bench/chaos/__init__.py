"""The chaos harness: a cluster of real processes, hostile prefill peers, a load
generator, a fault schedule and the invariants every request must meet. Used by
`pdserve bench --chaos/--soak` (bench/chaos_bench.py) and tests/chaos."""
