"""Deployment: Ray launcher and job entrypoint (deploy/ray)."""
