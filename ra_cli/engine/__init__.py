"""Inference engine: attention dispatch, caches, prefill and decode."""
