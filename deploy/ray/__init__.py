"""pdserve on Ray: launcher (``pdserve up``), role actors, registry, job entrypoint."""
