"""Video moment retrieval: CDNet, span geometry, Hungarian matching and loss, post-processing, query items."""
