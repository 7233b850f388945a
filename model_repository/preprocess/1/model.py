"""Triton python model: uint8 images (B, H, W, 3) -> normalised float32 pixels (B, 3, H, W).

Mean and std come from the exported model's manifest (config parameters), through the same
`preprocess_images` that training used.
"""

import json

from xmr.export import pb
from xmr.models.image_text.preprocess import preprocess_images


class TritonPythonModel:
    def initialize(self, args):
        folder, params = pb.setup(args)
        self.spec = pb.spec_from(folder)
        self.mean, self.std = json.loads(params["pixel_mean"]), json.loads(params["pixel_std"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb.read_inputs(request, self.spec)["image"]
                responses.append(pb.respond({"pixel_values": preprocess_images(images, self.mean, self.std)}))
            except ValueError as e:
                responses.append(pb.respond(e))
        return responses
