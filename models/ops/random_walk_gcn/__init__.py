"""`random_walk_gcn`, ViSERN's graph-reasoning op: every implementation of it lives in this folder."""

from xmr.models.ops.random_walk_gcn.torch_op import (
    AFFINITIES,
    RandomWalkGCNLayer,
    random_walk_gcn,
    random_walk_gcn_plugin,
    random_walk_gcn_reference,
    transition_matrix,
)

__all__ = [
    "AFFINITIES",
    "RandomWalkGCNLayer",
    "random_walk_gcn",
    "random_walk_gcn_plugin",
    "random_walk_gcn_reference",
    "transition_matrix",
]
