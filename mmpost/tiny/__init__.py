"""Tiny models built from configs, for tests and the offline demo."""
