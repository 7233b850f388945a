"""`random_walk_gcn`, ViSERN's graph-reasoning op: every implementation of it lives in this folder.

`reference.py` (the op in plain torch), `torch_op.py` (custom op `xmr::random_walk_gcn`, call forms,
`RandomWalkGCNLayer`), `onnx_op.py` (`xmr::RandomWalkGCN` schema + translation), `numpy_ref.py` (its
numpy op).
"""

from xmr.models.ops.random_walk_gcn.reference import AFFINITIES, random_walk_gcn_reference, transition_matrix
from xmr.models.ops.random_walk_gcn.torch_op import (
    RandomWalkGCNLayer,
    random_walk_gcn,
    random_walk_gcn_plugin,
)

__all__ = [
    "AFFINITIES",
    "RandomWalkGCNLayer",
    "random_walk_gcn",
    "random_walk_gcn_plugin",
    "random_walk_gcn_reference",
    "transition_matrix",
]
