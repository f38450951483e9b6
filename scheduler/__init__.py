"""Shoal's control plane: job specs, the scheduling policy, the store, the service loop, the API and CLI."""
