"""Triton python model: top-k gallery search with FAISS over the exported gallery embeddings.

gallery.npy (N, D) float32 unit vectors and gallery_ids.npy (N,) int64 are loaded once; a dynamic batch
is searched with one FAISS call at the largest requested k.
"""

import numpy as np

from xmr.export import pb
from xmr.export.runtime import GalleryIndex


class TritonPythonModel:
    def initialize(self, args):
        folder, params = pb.setup(args)
        self.spec = pb.spec_from(folder)
        embeddings = np.load(folder / "gallery.npy", allow_pickle=False)
        ids = np.load(folder / "gallery_ids.npy", allow_pickle=False)
        self.index = GalleryIndex(embeddings, ids, kind=params["index"], max_k=int(params["max_k"]))

    def execute(self, requests):
        ok, inputs, slots = pb.collect(requests, self.spec)
        found = self.index.search_requests([(x["query_embedding"], x["top_k"]) for x in inputs])
        for i, result in zip(ok, found, strict=True):
            slots[i] = result
        return [pb.respond(r) for r in slots]
