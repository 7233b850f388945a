"""Triton python model hosting ONNX Runtime (CPU) for the exported image tower (model.onnx).

All requests of a dynamic batch run as one ONNX Runtime call, then the outputs are split back per request.
"""

from xmr.export import pb
from xmr.export.runtime import OnnxRunner


class TritonPythonModel:
    def initialize(self, args):
        folder, params = pb.setup(args)
        self.runner = OnnxRunner(folder / "model.onnx", pb.spec_from(folder), threads=int(params["threads"]))

    def execute(self, requests):
        ok, inputs, slots = pb.collect(requests, self.runner.spec)
        for i, result in zip(ok, self.runner.run_requests(inputs), strict=True):
            slots[i] = result
        return [pb.respond(r) for r in slots]
