"""Prefill worker: serves ``Prefill`` and streams the prompt's KV as it is computed."""
