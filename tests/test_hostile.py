"""Hostile input against every served model, over both protocols, through the real tritonserver.

One server per module on a repository serving every family (the tiny image-text artifact, a cheap ViSERN
and a cheap CDNet: `every_family_repository`), plus the ensemble form of `moment_search` for the stop test.
`CASES` is the catalogue: per served model (the entry points and each composing model called directly),
the inputs of a bad request and a pattern its error message must match (naming the input, and where it
applies the offending value and the expected range). Each case
runs over gRPC (tritonclient.grpc) and HTTP (tritonclient.http, binary tensors) and must be refused with
INVALID_ARGUMENT / 400 (never INTERNAL / 500, never an answer), after which the answers to the reference
queries (`REFERENCE`) must be unchanged. `RAW_HTTP` holds the requests only a hand-written HTTP body can
make (malformed JSON, lying shapes, a gzip bomb), sent with urllib.

What Triton 2.51 itself gets wrong is marked as such (xfail, strict: a fixed Triton flips them):
- its HTTP frontend answers a JSON body it cannot parse with 500, not 400;
(Its HTTP frontend also casts a JSON integer into the declared type without a range check: an INT32
`top_k` of 4294967301 arrived as 5. The served `top_k` is INT64, so the model sees the real value and
refuses it: the `top-k-2**32+5` case.)
Not in the catalogue because it takes the server down: a JSON request whose declared shape is huge (e.g.
[1000000000, 256] with a few values) makes Triton 2.51's HTTP frontend allocate that shape before any
check; it aborts with std::bad_alloc (the binary-tensor and gRPC paths check sizes first). See README.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from xmr.export.iospec import ModelSpec
from xmr.export.repository import BOUNDS, add_ensemble_form, read_serving
from xmr.export.runners import read_bounds

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROTOCOLS = ("grpc", "http")
GOOD_TEXT = "a red circle above a blue square"


# ----------------------------------------------------------------------------- what the repository serves


@dataclass
class Facts:
    """What the cases are built from: the served specs and bounds of the repository under test."""

    specs: dict[str, ModelSpec]
    bounds: dict[str, dict]  # model -> {(tensor, of): Bound}
    gallery: dict[str, int]  # gallery model -> its size

    def dim(self, model: str, tensor: str, axis: int) -> int:
        t = next(t for t in (*self.specs[model].inputs, *self.specs[model].outputs) if t.name == tensor)
        return int(t.shape[axis])

    def limit(self, model: str, tensor: str, of: str = "values", end: str = "hi"):
        return getattr(self.bounds[model][(tensor, of)], end)

    def vocab(self, model: str) -> int:
        return int(self.limit(model, "input_ids")) + 1


def read_facts(repository) -> Facts:
    serving = read_serving(repository)
    specs = {n: ModelSpec.from_dict(d) for n, d in serving["specs"].items()}
    bounds = {n: {(b.tensor, b.of): b for b in read_bounds(repository / n / "1" / BOUNDS)} for n in specs}
    gallery = {  # the gallery models the repository serves
        n: len(np.load(repository / n / "1" / "gallery.npy", mmap_mode="r"))
        for n in ("gallery_topk", "video_gallery_topk")
        if n in specs
    }
    return Facts(specs, bounds, gallery)


def text(*items: bytes | str) -> np.ndarray:
    return np.array([[t.encode() if isinstance(t, str) else t] for t in items], dtype=object)


def col(value, dtype, rows: int = 1) -> np.ndarray:
    """A one-value-per-row input as the client sends it: (rows, 1)."""
    return np.full((rows, 1), value, dtype=dtype)


def good(f: Facts, model: str) -> dict[str, np.ndarray]:
    """A valid request of one row for `model` (every served model has one here)."""
    d = f.dim
    ids, lengths = np.array([[2, 3, 4]], np.int64), col(3, np.int64)
    if model in ("text_search", "text_video_search"):
        return {"text": text(GOOD_TEXT), "top_k": col(3, np.int64)}
    if model in ("tokenizer", "video_tokenizer", "moment_tokenizer"):
        return {"text": text(GOOD_TEXT)}
    if model in ("text_encoder", "video_text_encoder"):
        return {"input_ids": ids, "lengths": lengths}
    if model in ("gallery_topk", "video_gallery_topk"):
        dim = d(model, "query_embedding", 1)
        return {"query_embedding": np.full((1, dim), dim**-0.5, np.float32), "top_k": col(3, np.int64)}
    if model in ("image_embed", "preprocess"):
        return {"image": np.full((1, d(model, "image", 1), d(model, "image", 2), 3), 128, np.uint8)}
    if model == "image_encoder":
        return {
            "pixel_values": np.zeros(
                (1, 3, d(model, "pixel_values", 2), d(model, "pixel_values", 3)), np.float32
            )
        }
    if model in ("video_embed", "video_encoder"):
        k, dr = d(model, "regions", 2), d(model, "regions", 3)
        return {"regions": np.zeros((1, 2, k, dr), np.float32), "frame_mask": np.ones((1, 2), bool)}
    if model == "moment_search":
        return {"text": text(GOOD_TEXT), "video_id": col(0, np.int64), "top_k": col(3, np.int64)}
    if model == "moment_clips":
        return {"video_id": col(0, np.int64)}
    if model == "moment_model":
        clips = np.full((1, 4, d(model, "clips", 2)), 0.5, np.float32)
        return {"clips": clips, "clip_mask": np.ones((1, 4), bool), "input_ids": ids, "lengths": lengths}
    if model == "moment_postprocess":
        q = d(model, "spans", 1)
        return {
            "spans": np.full((1, q, 2), 0.5, np.float32),
            "logits": np.zeros((1, q), np.float32),
            "durations": col(f.limit(model, "durations"), np.float32),
            "top_k": col(3, np.int64),
        }
    raise KeyError(model)


# ----------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """One hostile request: `model` gets `good(model)` changed by `change` (None drops an input; a
    (array, datatype) pair sends that datatype), and must answer an error matching `expect`."""

    model: str
    name: str
    change: Callable[[Facts, dict], dict]
    expect: str | Callable[[Facts], str]
    outputs: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.model}-{self.name}"


def swap(**new):
    return lambda f, x: {**x, **new}


def swap_f(fn):
    """`fn(f, x)` -> the inputs to change."""
    return lambda f, x: {**x, **fn(f, x)}


def filled(name: str, value, dtype=np.float32):
    return swap_f(lambda f, x: {name: np.full_like(x[name], value, dtype=dtype)})


def text_cases(model: str) -> list[Case]:
    return [
        Case(model, "empty-text", swap(text=text("")), r"text 0 is empty"),
        Case(model, "invalid-utf8", swap(text=text(b"\xff\xfe red")), r"text 0 is not valid UTF-8"),
        Case(model, "4097-bytes", swap(text=text("a" * 4097)), r"text 0 is 4097 bytes; the limit is 4096"),
    ]


def top_k_cases(model: str, size: Callable[[Facts], int]) -> list[Case]:
    return [
        Case(model, "top-k-0", swap(top_k=col(0, np.int64)), r"top_k is 0; expected 1 <= top_k"),
        Case(model, "top-k-negative", swap(top_k=col(-7, np.int64)), r"top_k is -7; expected 1 <= top_k"),
        Case(
            model,
            "top-k-past-size",
            swap_f(lambda f, x: {"top_k": col(size(f) + 1, np.int64)}),
            lambda f: rf"top_k is {size(f) + 1}; expected 1 <= top_k <= {size(f)}",
        ),
    ]


def token_cases(model: str) -> list[Case]:
    return [
        Case(
            model,
            "id-past-vocabulary",
            swap_f(
                lambda f, x: {
                    "input_ids": np.array([[2, f.vocab(model)]], np.int64),
                    "lengths": col(2, np.int64),
                }
            ),
            lambda f: (
                rf"input 'input_ids' holds {f.vocab(model)}; expected 0 <= value <= "
                rf"{f.vocab(model) - 1} \(the vocabulary has {f.vocab(model)} tokens\)"
            ),
        ),
        Case(
            model,
            "id-huge",
            swap(input_ids=np.array([[2, 10**12, 3]], np.int64)),
            r"input 'input_ids' holds 1000000000000; .*vocabulary",
        ),
        Case(model, "id-negative", swap(input_ids=np.array([[2, -1, 3]], np.int64)), r"'input_ids' holds -1"),
        Case(model, "length-0", swap(lengths=col(0, np.int64)), r"input 'lengths' holds 0; expected 1 <="),
        Case(model, "length-past-tokens", swap(lengths=col(4, np.int64)), r"input 'lengths' holds 4"),
        Case(
            model,
            "too-many-tokens",
            swap_f(
                lambda f, x: {"input_ids": np.ones((1, f.limit(model, "input_ids", "tokens") + 1), np.int64)}
            ),
            lambda f: rf"input 'input_ids' has {f.limit(model, 'input_ids', 'tokens') + 1} tokens",
        ),
        Case(
            model,
            "ids-int32",
            swap(input_ids=(np.ones((1, 3), np.int32), "INT32")),
            r"input 'input_ids' data-type is 'INT32', but model '\w+' expects 'INT64'",
        ),
    ]


def query_cases(model: str) -> list[Case]:
    q, norm = "query_embedding", r"'query_embedding' row 0 has L2 norm"
    wider = swap_f(lambda f, x: {q: np.zeros((1, x[q].shape[1] + 1), np.float32)})
    return [
        Case(model, "query-1e38", filled(q, 1e38), rf"{norm} 1\.6e\+39; expected 0\.1 <= norm <= 10"),
        Case(model, "query-minus-1e38", filled(q, -1e38), norm),
        Case(model, "query-nan", filled(q, np.nan), r"'query_embedding' contains NaN"),
        Case(model, "query-inf", filled(q, np.inf), r"'query_embedding' contains NaN or infinite"),
        Case(model, "query-zero", filled(q, 0.0), rf"{norm} 0; expected"),
        Case(model, "query-1e-30", filled(q, 1e-30), rf"{norm} 1\.6e-29"),
        Case(model, "query-wrong-dim", wider, r"unexpected shape for input 'query_embedding'"),
        *top_k_cases(model, lambda f: f.gallery[model]),
    ]


CASES: list[Case] = [
    # image-text: the entry points
    *text_cases("text_search"),
    Case("text_search", "no-known-words", swap(text=text("zebra giraffe")), r"text 0 has no known words"),
    Case("text_search", "nul-bytes", swap(text=text("\x00\x00")), r"text 0 has no known words"),
    *top_k_cases("text_search", lambda f: f.gallery["gallery_topk"]),
    Case(
        "text_search",
        "top-k-int64-max",
        swap(top_k=col(2**63 - 1, np.int64)),
        r"top_k is 9223372036854775807",
    ),
    Case(
        "text_search",
        "top-k-differs-across-rows",
        swap(text=text(GOOD_TEXT, GOOD_TEXT), top_k=np.array([[3], [5]], np.int64)),
        r"top_k differs across the rows of one request",
    ),
    Case(
        "text_search",
        "top-k-int32",
        swap(top_k=(col(3, np.int32), "INT32")),
        r"input 'top_k' data-type is 'INT32', but model 'text_search' expects 'INT64'",
    ),
    Case(
        "text_search",
        "text-fp32",
        swap(text=(np.zeros((1, 1), np.float32), "FP32")),
        r"input 'text' data-type is 'FP32', but model 'text_search' expects 'BYTES'",
    ),
    Case("text_search", "missing-top-k", swap(top_k=None), r"missing required input\(s\) \['top_k'\]"),
    Case(
        "text_search", "unknown-input", swap(bogus=np.zeros((1, 1), np.float32)), r"Got input\(s\) \['bogus'"
    ),
    Case(
        "text_search",
        "text-shape",
        swap(text=np.array([[b"a", b"b"]], dtype=object)),
        r"unexpected shape for input 'text'",
    ),
    Case("text_search", "unknown-output", swap(), r"unexpected inference output 'bogus'", outputs=("bogus",)),
    Case(
        "image_embed",
        "image-size",
        swap(image=np.zeros((1, 8, 8, 3), np.uint8)),
        r"unexpected shape for input 'image'",
    ),
    Case(
        "image_embed",
        "image-fp32",
        swap_f(lambda f, x: {"image": (x["image"].astype(np.float32), "FP32")}),
        r"input 'image' data-type is 'FP32', but model 'image_embed' expects 'UINT8'",
    ),
    # image-text: the composing models called directly
    *text_cases("tokenizer"),
    *token_cases("text_encoder"),
    *query_cases("gallery_topk"),
    Case(
        "preprocess",
        "channels-first",
        swap_f(lambda f, x: {"image": np.zeros((1, 3, *x["image"].shape[1:3]), np.uint8)}),
        r"unexpected shape for input 'image'",
    ),
    Case(
        "image_encoder",
        "pixels-1e30",
        filled("pixel_values", 1e30),
        r"input 'pixel_values' holds 1e\+30; expected -0\.404 <= value <= 3\.604 \(uint8 pixels normalised",
    ),
    Case(
        "image_encoder",
        "pixels-minus-1e30",
        filled("pixel_values", -1e30),
        r"'pixel_values' holds -1e\+30; expected",
    ),
    Case(
        "image_encoder",
        "pixels-just-above",
        filled("pixel_values", 3.7),
        r"'pixel_values' holds 3\.7; expected",
    ),
    Case("image_encoder", "pixels-nan", filled("pixel_values", np.nan), r"'pixel_values' contains NaN"),
    Case(
        "image_encoder",
        "pixels-inf",
        filled("pixel_values", -np.inf),
        r"'pixel_values' contains NaN or infinite",
    ),
    # text-video
    *text_cases("text_video_search"),
    *top_k_cases("text_video_search", lambda f: f.gallery["video_gallery_topk"]),
    Case("video_tokenizer", "invalid-utf8", swap(text=text(b"\xc3\x28")), r"text 0 is not valid UTF-8"),
    *token_cases("video_text_encoder")[:4],
    *query_cases("video_gallery_topk")[:5],
    Case(
        "video_embed",
        "no-real-frame",
        swap(frame_mask=np.zeros((1, 2), bool)),
        r"input 'frame_mask' row 0 has 0 true values; expected true values >= 1",
    ),
    Case("video_embed", "regions-nan", filled("regions", np.nan), r"'regions' contains NaN"),
    Case("video_encoder", "regions-inf", filled("regions", np.inf), r"'regions' contains NaN or infinite"),
    Case(
        "video_encoder",
        "regions-1e30",
        filled("regions", 1e30),
        r"video_encoder produced NaN or infinite 'video_embedding' .*'regions'",
    ),
    Case(
        "video_encoder",
        "no-real-frame",
        swap(frame_mask=np.zeros((1, 2), bool)),
        r"'frame_mask' row 0 has 0 true",
    ),
    Case(
        "video_encoder",
        "regions-shape",
        swap_f(lambda f, x: {"regions": x["regions"][..., :-1].copy()}),
        r"unexpected shape for input 'regions'",
    ),
    Case(
        "video_encoder",
        "mask-uint8",
        swap(frame_mask=(np.ones((1, 2), np.uint8), "UINT8")),
        r"input 'frame_mask' data-type is 'UINT8'",
    ),
    # moments
    Case(
        "moment_search",
        "unknown-video",
        swap(video_id=col(123456, np.int64)),
        r"video_id 123456 is not in the clip store",
    ),
    Case(
        "moment_search",
        "negative-video",
        swap(video_id=col(-1, np.int64)),
        r"video_id -1 is not in the clip store",
    ),
    Case("moment_search", "empty-text", swap(text=text("")), r"text 0 is empty"),
    Case("moment_search", "top-k-0", swap(top_k=col(0, np.int64)), r"top_k is 0; expected 1 <= top_k"),
    Case(
        "moment_search",
        "top-k-past-proposals",
        swap_f(lambda f, x: {"top_k": col(f.dim("moment_postprocess", "spans", 1) + 1, np.int64)}),
        r"top_k is \d+; expected 1 <= top_k <= \d+ \(the model proposes",
    ),
    Case(
        "moment_tokenizer",
        "4097-bytes",
        swap(text=text("b" * 4097)),
        r"text 0 is 4097 bytes; the limit is 4096",
    ),
    Case(
        "moment_clips",
        "unknown-video",
        swap(video_id=col(10**15, np.int64)),
        r"video_id 1000000000000000 is not",
    ),
    Case(
        "moment_clips",
        "video-id-int32",
        swap(video_id=(col(0, np.int32), "INT32")),
        r"input 'video_id' data-type is 'INT32'",
    ),
    Case(
        "moment_model",
        "clips-1e30",
        filled("clips", 1e30),
        r"input 'clips' holds 1e\+30; expected .* \(the clip store's",
    ),
    Case("moment_model", "clips-nan", filled("clips", np.nan), r"'clips' contains NaN"),
    Case(
        "moment_model",
        "no-real-clip",
        swap(clip_mask=np.zeros((1, 4), bool)),
        r"'clip_mask' row 0 has 0 true values",
    ),
    Case(
        "moment_model",
        "too-many-clips",
        swap_f(
            lambda f, x: {
                "clips": np.zeros(
                    (1, f.limit("moment_model", "clips", "clips") + 1, x["clips"].shape[2]), np.float32
                ),
                "clip_mask": np.ones((1, f.limit("moment_model", "clips", "clips") + 1), bool),
            }
        ),
        lambda f: (
            rf"input 'clips' has {f.limit('moment_model', 'clips', 'clips') + 1} clips \(axis 1\); expected"
        ),
    ),
    *token_cases("moment_model")[:4],
    Case(
        "moment_postprocess",
        "duration-0",
        filled("durations", 0.0),
        r"durations \[0\.0\] must be finite and > 0",
    ),
    Case(
        "moment_postprocess", "duration-negative", filled("durations", -3.0), r"durations \[-3\.0\] must be"
    ),
    Case(
        "moment_postprocess",
        "duration-1e38",
        filled("durations", 1e38),
        r"input 'durations' holds 1e\+38; expected",
    ),
    Case("moment_postprocess", "spans-nan", filled("spans", np.nan), r"'spans' contains NaN"),
    Case(
        "moment_postprocess",
        "spans-1e30",
        filled("spans", 1e30),
        r"input 'spans' holds 1e\+30; expected 0 <=",
    ),
    Case("moment_postprocess", "logits-inf", filled("logits", np.inf), r"'logits' contains NaN or infinite"),
    *top_k_cases("moment_postprocess", lambda f: f.dim("moment_postprocess", "spans", 1)),
]
assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# ----------------------------------------------------------------------------- clients


@dataclass
class Refused:
    status: str  # "StatusCode.INVALID_ARGUMENT" (gRPC) or the HTTP status code
    message: str


@dataclass
class Server:
    triton: object
    facts: Facts
    clients: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)

    def client(self, protocol: str):
        if protocol not in self.clients:
            if protocol == "grpc":
                import tritonclient.grpc as tc

                self.clients[protocol] = (tc, tc.InferenceServerClient(self.triton.grpc_url))
            else:
                import tritonclient.http as tc

                self.clients[protocol] = (
                    tc,
                    tc.InferenceServerClient(self.triton.http_url, network_timeout=120),
                )
        return self.clients[protocol]

    def infer(self, protocol: str, model: str, inputs: dict, outputs=()) -> dict | Refused:
        from tritonclient.utils import InferenceServerException

        tc, client = self.client(protocol)
        request = []
        spec = self.facts.specs.get(model) or self.facts.specs[model.removesuffix("_ensemble")]
        for name, value in inputs.items():
            if value is None:
                continue
            array, datatype = value if isinstance(value, tuple) else (value, None)
            dtype = datatype or (spec.input(name).client_dtype if name in spec.input_names else "FP32")
            x = tc.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            request.append(x)
        wanted = [tc.InferRequestedOutput(o) for o in outputs] or None
        try:
            result = client.infer(model, request, outputs=wanted)
        except InferenceServerException as e:
            return Refused(str(e.status()), e.message())
        return {o.name: result.as_numpy(o.name) for o in spec.outputs}

    def answers(self) -> dict:
        """The answers to the reference queries: one per entry point of each family."""
        f = self.facts
        out = {}
        for model in ("text_search", "image_embed", "text_video_search", "video_embed", "moment_search"):
            result = self.infer("grpc", model, good(f, model))
            assert isinstance(result, dict), (model, result)
            out[model] = result
        return out


def assert_same(got: dict, want: dict) -> None:
    for model, outputs in want.items():
        for name, value in outputs.items():
            if value.dtype.kind in "iub":
                np.testing.assert_array_equal(got[model][name], value, err_msg=f"{model} {name}")
            else:
                np.testing.assert_allclose(got[model][name], value, atol=1e-5, err_msg=f"{model} {name}")


ENSEMBLE_FORM = "moment_search_ensemble"  # the gpu target's moment_search, served beside the cpu one


@pytest.fixture(scope="module")
def server(every_family_repository, tmp_path_factory):
    """The every-family repository (copied) with the ensemble form of moment_search added under
    ENSEMBLE_FORM (what the gpu target serves; the cpu target serves one python model)."""
    from xmr.clients.server import TritonServer

    repository = tmp_path_factory.mktemp("hostile") / "repository"
    shutil.copytree(every_family_repository, repository)
    add_ensemble_form(repository, "moment_search", ENSEMBLE_FORM)
    triton = TritonServer(repository).start()
    s = Server(triton, read_facts(repository))
    s.reference = s.answers()
    yield s
    triton.stop()


def expected(case: Case, f: Facts) -> str:
    return case.expect(f) if callable(case.expect) else case.expect


# ----------------------------------------------------------------------------- the tests


def test_the_catalogue_covers_every_served_model_and_both_protocols(server):
    assert {c.model for c in CASES} == set(server.facts.specs)
    assert len(CASES) * len(PROTOCOLS) + len(RAW_HTTP) >= 60


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_the_clients_error_and_changes_nothing(server, case, protocol):
    f = server.facts
    inputs = case.change(f, good(f, case.model))
    result = server.infer(protocol, case.model, inputs, case.outputs)
    assert isinstance(result, Refused), f"{case.id}: answered {result}"
    assert result.status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"), result
    assert re.search(expected(case, f), result.message), result.message
    assert_same(server.answers(), server.reference)


@dataclass(frozen=True)
class Raw:
    """A hand-made HTTP request: `body` (a JSON-able object, or bytes), extra headers; `status` and
    `expect` what the server must answer; `triton_bug` marks what Triton 2.51 answers wrongly."""

    name: str
    model: str
    body: object
    expect: str
    headers: dict = field(default_factory=dict)
    triton_bug: str = ""


def t_(value) -> dict:
    return {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [value]}


def k_(value) -> dict:
    return {"name": "top_k", "shape": [1, 1], "datatype": "INT64", "data": [value]}


def q_(value, n: int = 256, datatype: str = "FP32", shape=None) -> dict:
    return {"name": "query_embedding", "shape": shape or [1, n], "datatype": datatype, "data": [value] * n}


PARSE_500 = "Triton 2.51's HTTP frontend answers a JSON body it cannot parse with 500, not 400"
BOMB = json.dumps({"inputs": [t_("a" * (64 << 20)), k_(3)]}).encode()
RAW_HTTP = [
    Raw(
        "gzip-bomb-64MiB",
        "text_search",
        gzip.compress(BOMB),
        r"text 0 is 67108864 bytes; the limit is 4096",
        {"Content-Encoding": "gzip"},
    ),
    Raw(
        "deflate-bomb-64MiB",
        "tokenizer",
        zlib.compress(json.dumps({"inputs": [t_("b" * (64 << 20))]}).encode()),
        r"text 0 is 67108864 bytes",
        {"Content-Encoding": "deflate"},
    ),
    Raw(
        "query-1e38-json",
        "gallery_topk",
        {"inputs": [q_(1e38), k_(3)]},
        r"'query_embedding' row 0 has L2 norm",
    ),
    Raw(
        "ids-past-vocabulary-json",
        "text_encoder",
        {
            "inputs": [
                {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 10**12]},
                {"name": "lengths", "shape": [1, 1], "datatype": "INT64", "data": [2]},
            ]
        },
        r"input 'input_ids' holds 1000000000000",
    ),
    Raw(
        "fp64-for-fp32",
        "gallery_topk",
        {"inputs": [q_(0.0625, datatype="FP64"), k_(3)]},
        r"input 'query_embedding' data-type is 'FP64'",
    ),
    Raw(
        "unknown-datatype",
        "gallery_topk",
        {"inputs": [q_(0.0625, datatype="FLOAT"), k_(3)]},
        r"invalid datatype for input query_embedding",
    ),
    Raw(
        "duplicate-input",
        "text_search",
        {"inputs": [t_(GOOD_TEXT), k_(3), k_(4)]},
        r"input 'top_k' already exists",
    ),
    Raw(
        "batch-mismatch",
        "text_search",
        {"inputs": [{**t_(GOOD_TEXT), "shape": [2, 1], "data": [GOOD_TEXT] * 2}, k_(3)]},
        r"input 'text' batch size does not match",
    ),
    Raw(
        "header-length-past-body",
        "text_search",
        b'{"inputs":[]}',
        r"inference header size",
        {"Inference-Header-Content-Length": "100000"},
    ),
    Raw("binary-huge-declared-shape", "gallery_topk", b"", r"'query_embedding' batch size does not match"),
    Raw(
        "top-k-2**32+5",
        "text_search",
        {"inputs": [t_(GOOD_TEXT), k_(2**32 + 5)]},
        r"top_k is 4294967301",
    ),
    Raw(
        "top-k-2**63+5",
        "text_search",
        {"inputs": [t_(GOOD_TEXT), k_(2**63 + 5)]},
        r"'data'",
        triton_bug=PARSE_500,
    ),
    Raw("top-k-string", "text_search", {"inputs": [t_(GOOD_TEXT), k_("5")]}, r"'data'", triton_bug=PARSE_500),
    Raw("malformed-json", "text_search", b'{"inputs": [', r"JSON", triton_bug=PARSE_500),
    Raw(
        "data-shorter-than-shape",
        "gallery_topk",
        {"inputs": [q_(0.1, shape=[1, 256], n=10), k_(3)]},
        r"'data'",
        triton_bug=PARSE_500,
    ),
    Raw(
        "negative-shape",
        "text_search",
        {"inputs": [{**t_(GOOD_TEXT), "shape": [-1, 1]}, k_(3)]},
        r"'shape'",
        triton_bug=PARSE_500,
    ),
]


def binary_huge_shape() -> tuple[bytes, dict]:
    """A binary-tensor request declaring a [10**9, 256] query with 256 values in its body."""
    query = {"name": "query_embedding", "shape": [10**9, 256], "datatype": "FP32"}
    top_k = {"name": "top_k", "shape": [1, 1], "datatype": "INT64"}
    query["parameters"], top_k["parameters"] = {"binary_data_size": 1024}, {"binary_data_size": 8}
    header = json.dumps({"inputs": [query, top_k]}).encode()
    body = header + np.full(256, 0.0625, np.float32).tobytes() + np.array([3], np.int64).tobytes()
    return body, {"Inference-Header-Content-Length": str(len(header))}


def post(url: str, model: str, body: bytes, headers: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(2000).decode(errors="replace")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=r.triton_bug) if r.triton_bug else ())
        for r in RAW_HTTP
    ],
    ids=[r.name for r in RAW_HTTP],
)
def test_hand_made_http_requests_are_refused_and_change_nothing(server, raw):
    if raw.name == "binary-huge-declared-shape":
        body, headers = binary_huge_shape()
    else:
        body = raw.body if isinstance(raw.body, bytes) else json.dumps(raw.body).encode()
        headers = raw.headers
    status, message = post(server.triton.http_url, raw.model, body, headers)
    assert_same(server.answers(), server.reference)  # first: what a Triton bug must not break either
    assert status != 200 and re.search(raw.expect, message), (status, message)
    assert status == 400, (status, message)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_100MB_text_is_refused_naming_its_size(server, protocol):
    """Triton 2.51 has no request size limit to configure (no --http-max-input-size; gRPC takes up to
    2 GiB): the request is read and handed to the model, which refuses it before decoding it."""
    inputs = {"text": text(b"a" * (100 << 20)), "top_k": col(3, np.int64)}
    result = server.infer(protocol, "text_search", inputs)
    assert isinstance(result, Refused) and "text 0 is 104857600 bytes; the limit is 4096" in result.message
    assert result.status in ("StatusCode.INVALID_ARGUMENT", "400")
    assert_same(server.answers(), server.reference)


BATCHED = {  # dynamically batched models: one bad request among good ones in the same batches
    "text_search": swap(text=text("")),
    "text_encoder": token_cases("text_encoder")[0].change,
    "gallery_topk": filled("query_embedding", 1e38),
    "image_encoder": filled("pixel_values", 1e30),
    "video_text_encoder": token_cases("video_text_encoder")[0].change,
    "video_encoder": swap(frame_mask=np.zeros((1, 2), bool)),
    "video_gallery_topk": filled("query_embedding", np.nan),
    "moment_model": filled("clips", 1e30),
}


@pytest.mark.parametrize("model", list(BATCHED))
def test_a_bad_request_fails_alone_in_its_dynamic_batch(server, model):
    f = server.facts
    good_inputs, bad_inputs = good(f, model), BATCHED[model](f, good(f, model))
    alone = server.infer("grpc", model, good_inputs)
    assert isinstance(alone, dict)
    with ThreadPoolExecutor(8) as pool:  # the gRPC client is thread-safe
        results = list(
            pool.map(lambda i: server.infer("grpc", model, bad_inputs if i % 2 else good_inputs), range(24))
        )
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, Refused) and result.status == "StatusCode.INVALID_ARGUMENT", result
        else:
            assert isinstance(result, dict), result
            assert_same({model: result}, {model: alone})


def test_a_graceful_stop_returns_within_seconds_after_failed_ensemble_steps(server):
    """A moment_search ensemble request whose clip-store step fails while its tokenizer step runs (they
    run in parallel) is never released by Triton 2.51's ensemble scheduler: a graceful stop would wait
    Triton's default exit timeout (30 s) for it; the server is started with a short one
    (`TritonServer.exit_timeout_s`). (Runs last: it stops the module's server.)"""
    for video_id in (123456, 654321):
        inputs = {**good(server.facts, "moment_search"), "video_id": col(video_id, np.int64)}
        result = server.infer("grpc", ENSEMBLE_FORM, inputs)
        assert isinstance(result, Refused) and "video_id" in result.message, result
    start = time.monotonic()
    server.triton.stop()
    assert time.monotonic() - start < 10.0
