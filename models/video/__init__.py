"""Text-video retrieval: ViSERN, ProTA, the frame backbone that gives them region features, their inputs."""
