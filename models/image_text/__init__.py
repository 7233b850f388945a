"""Image-text retrieval: RVSE++ (towers, pooling), image preprocessing, continuous relevance labels."""
