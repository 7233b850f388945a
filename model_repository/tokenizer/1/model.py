"""Triton python model: BYTES text (B, 1) -> input_ids (B, T), lengths (B,) with the run's tokenizer.json.

The same `encode_batch` as training, so served ids equal training ids. Each request is tokenised on its own
(each gets its own padded length); a bad text fails only its own request.
"""

from xmr.export import pb
from xmr.export.runtime import decode_texts
from xmr.models.tokenizer import TextLimits, encode_batch, load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        folder, params = pb.setup(args)
        self.spec = pb.spec_from(folder)
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.limits = TextLimits(max_tokens=int(params["max_tokens"]), max_bytes=int(params["max_bytes"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = decode_texts(pb.read_inputs(request, self.spec)["text"])
                ids, lengths = encode_batch(self.tokenizer, texts, self.limits)
                responses.append(pb.respond({"input_ids": ids, "lengths": lengths}))
            except ValueError as e:
                responses.append(pb.respond(e))
        return responses
