"""Training: one loop (`loop.fit`) and one task per model family."""
