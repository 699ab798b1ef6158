"""Router: the public gRPC API; tokenizes, validates, picks workers, relays. No torch."""
