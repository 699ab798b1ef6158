"""Decode worker: serves ``Generate``; receives KV from prefill workers; decodes."""
