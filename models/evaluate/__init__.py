"""Scoring: retrieval and moment metrics, and the PyTorch reference scores that export and serving reuse."""
