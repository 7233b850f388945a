"""One interface over every backend that runs an exported model: `run(feeds) -> outputs`, by tensor name.

A runner holds the model's I/O spec (`spec`, from `iospec.py`), a `backend` label (what the manifests'
`parity.runtime` says) and `run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]` (Polygraphy's
runner convention), so exports, tests and benchmarks compare backends without knowing which they hold:
- `TorchRunner`: a PyTorch module (a `Tower` of the trained model), the reference of every parity figure;
- `OnnxRunner`: ONNX Runtime on CPU, checked against the spec (the served Triton models run it too);
- `ReferenceRunner`: `onnx.reference.ReferenceEvaluator` with the numpy implementations of the `xmr` ops,
  for plugin-form graphs that no stock runtime can run.

A new backend (TensorRT, a served model behind Triton) is one more class with `spec`, `backend` and `run`,
registered in `BACKENDS`; `FORM_BACKENDS` says which backend checks a graph of each custom-op form.
Each backend's library is imported when a runner of it is built, not with this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from xmr.export.iospec import ModelSpec
from xmr.models.errors import InputError

if TYPE_CHECKING:
    import torch

Feeds = dict[str, np.ndarray]


class Runner(Protocol):
    spec: ModelSpec
    backend: str

    def run(self, feeds: Feeds) -> Feeds: ...


def check_finite(name: str, x: np.ndarray) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError(f"input {name!r} contains NaN or infinite values")


def check_feeds(spec: ModelSpec, feeds: Feeds) -> Feeds:
    """The spec's inputs from `feeds`, in spec order; InputError on a missing input, a wrong dtype, a NaN,
    inputs that disagree on the size of a dim their specs name alike (ProTA's pair scorer: `frames` of
    video_mu and frame_mask), and token inputs that would be read as something else: negative
    `input_ids`, `lengths` outside 1..the number of tokens (a length 0 would average over no token and give
    NaN)."""
    sizes: dict[str, tuple[str, int]] = {}  # named dim -> (the first input that has it, its size)
    for t in spec.inputs:
        if t.name not in feeds:
            raise InputError(f"missing input {t.name!r} for {spec.name}")
        x = feeds[t.name]
        if x.dtype != t.numpy_dtype:
            raise InputError(f"input {t.name!r} has dtype {x.dtype}; expected {t.dtype}")
        check_finite(t.name, x)
        for dim, size in zip(t.shape, x.shape):  # noqa: B905 (Triton checks ranks; (B, 1) may stand for (B,))
            if isinstance(dim, str):
                first, known = sizes.setdefault(dim, (t.name, size))
                if size != known:
                    raise InputError(
                        f"input {t.name!r} has {size} along {dim!r}; input {first!r} has {known}: "
                        "they must agree"
                    )
    ids, lengths = feeds.get("input_ids"), feeds.get("lengths")
    if ids is not None and ids.size and ids.min() < 0:
        raise InputError(f"input 'input_ids' holds {int(ids.min())}; expected token ids >= 0")
    tokens = next((t.name for t in spec.inputs if t.shape[1:2] == ("tokens",)), None)
    if tokens is not None and lengths is not None and lengths.size and feeds[tokens].ndim >= 2:
        n = feeds[tokens].shape[1]
        bad = (lengths < 1) | (lengths > n)
        if bad.any():
            raise InputError(
                f"input 'lengths' holds {int(lengths[bad][0])}; expected 1 <= length <= {n} "
                f"(the number of tokens in {tokens})"
            )
    return {t.name: feeds[t.name] for t in spec.inputs}


@dataclass(frozen=True)
class Bound:
    """A limit on one input of a served model, checked before the model runs (`check_bounds`).

    `of` says what is limited: "values" (every value of the tensor), "norm" (each row's L2 norm), "true"
    (each row's number of true values: a mask marks at least one real frame), "bytes" (each BYTES item's
    length, checked before it is decoded), or the name of a dynamic dim of the tensor's spec (its size).
    `lo` and `hi` are inclusive (None: unbounded); `why` says where the range comes from (the manifest's
    vocabulary size, the preprocessing's mean and std, the gallery's norms), and ends the error message.
    `xmr repo` derives each served model's bounds from its artifact (`repository.input_bounds`) and writes
    them next to its spec (`bounds.json`).
    """

    tensor: str
    lo: float | None = None
    hi: float | None = None
    of: str = "values"
    why: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Bound:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def expected(self, what: str) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"{_num(self.lo)} <= {what} <= {_num(self.hi)}"
        elif self.lo is not None:
            text = f"{what} >= {_num(self.lo)}"
        else:
            text = f"{what} <= {_num(self.hi)}"
        return f"expected {text}" + (f" ({self.why})" if self.why else "")


def _num(x) -> str:
    """A bound or an offending value as text: integers whole, floats in 4 significant digits."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def _outside(values: np.ndarray, b: Bound) -> np.ndarray:
    bad = np.zeros(values.shape, dtype=bool)
    if b.lo is not None:
        bad |= values < b.lo
    if b.hi is not None:
        bad |= values > b.hi
    return bad


def check_bounds(spec: ModelSpec, bounds: Sequence[Bound], feeds: Feeds) -> None:
    """InputError naming the input, the offending value and the expected range for the first bound of
    `bounds` that `feeds` (one request, already through `check_feeds`) break."""
    for b in bounds:
        x = feeds.get(b.tensor)
        if x is None or x.size == 0:
            continue
        if b.of == "values":
            bad = _outside(x, b)
            if bad.any():
                value = x[bad].reshape(-1)[0]
                raise InputError(f"input {b.tensor!r} holds {_num(value)}; {b.expected('value')}")
        elif b.of == "norm":
            norms = np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), axis=1)
            bad = np.flatnonzero(_outside(norms, b))
            if len(bad):
                i = int(bad[0])
                raise InputError(
                    f"input {b.tensor!r} row {i} has L2 norm {_num(norms[i])}; {b.expected('norm')}"
                )
        elif b.of == "true":
            counts = x.reshape(len(x), -1).astype(bool).sum(axis=1)
            bad = np.flatnonzero(_outside(counts, b))
            if len(bad):
                i = int(bad[0])
                raise InputError(
                    f"input {b.tensor!r} row {i} has {int(counts[i])} true values; "
                    + b.expected("true values")
                )
        elif b.of == "bytes":
            for i, item in enumerate(x.reshape(-1)):
                n = len(item) if isinstance(item, bytes | str) else 0
                if b.hi is not None and n > b.hi:  # the tokenizer's own wording (encode_batch)
                    raise InputError(
                        f"{b.tensor} {i} is {n} bytes; the limit is {_num(b.hi)}"
                        + (f" ({b.why})" if b.why else "")
                    )
        else:  # the size of a named dynamic dim
            shape = spec.input(b.tensor).shape
            if b.of not in shape:
                raise InputError(f"bound on {b.of!r} of {b.tensor!r}: {spec.name}'s spec has no such dim")
            axis = shape.index(b.of)
            size = x.shape[axis] if axis < x.ndim else 0
            if _outside(np.array(size), b):
                raise InputError(f"input {b.tensor!r} has {size} {b.of} (axis {axis}); {b.expected(b.of)}")


def check_outputs(spec: ModelSpec, outputs: Feeds) -> Feeds:
    """InputError for a non-finite float output: on inputs that passed every check, NaN or infinity
    comes from values outside what the model was trained on; never return it as an answer."""
    for name, x in outputs.items():
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise InputError(
                f"{spec.name} produced NaN or infinite {name!r} for this input: the values of "
                f"{', '.join(repr(n) for n in spec.input_names)} are outside the range the model handles"
            )
    return outputs


BOUNDS = "bounds.json"  # a python model's bounds, next to its spec.json (`repository.input_bounds`)


def read_bounds(path: Path) -> tuple[Bound, ...]:
    """The bounds of `bounds.json` (a list of `Bound.to_dict()`); none where the file is absent (a
    repository written before bounds existed)."""
    import json

    path = Path(path)
    if not path.is_file():
        return ()
    return tuple(Bound.from_dict(d) for d in json.loads(path.read_text()))


def named_outputs(spec: ModelSpec, outputs) -> Feeds:
    """A backend's positional outputs (a sequence, or one array) -> {output name: array}."""
    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return dict(zip(spec.output_names, outputs, strict=True))


class TorchRunner:
    """A PyTorch module whose forward takes the spec's inputs by position and returns its outputs in order."""

    backend = "pytorch"

    def __init__(self, module: torch.nn.Module, spec: ModelSpec):
        self.module, self.spec = module.eval(), spec

    def run(self, feeds: Feeds) -> Feeds:
        import torch

        feeds = check_feeds(self.spec, feeds)
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(x) for x in feeds.values()))
        return {name: o.numpy() for name, o in named_outputs(self.spec, out).items()}


class OnnxRunner:
    """An ONNX Runtime CPU session for one exported model, checked against its I/O spec.

    `threads` sets the session's intra-op threads (0: ONNX Runtime's default, one per core).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: ModelSpec, threads: int = 1):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX model {path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types on corrupt files
            raise InputError(f"{path} is not a loadable ONNX model: {e}") from e
        self.spec = spec
        got = [i.name for i in self.session.get_inputs()]
        if got != spec.input_names:
            raise InputError(f"{path} has inputs {got}; its I/O spec says {spec.input_names}")

    def run(self, feeds: Feeds) -> Feeds:
        checked = check_feeds(self.spec, feeds)
        try:
            outputs = self.session.run(self.spec.output_names, checked)
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types)
            # On inputs that passed the spec's checks, a failure is the input's (a token id past the
            # vocabulary, an index out of range): an InputError, so a batch is retried request by request
            # (`run_requests`) and only the offending request fails, with ONNX Runtime's one-line reason.
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise InputError(f"{self.spec.name} cannot run on this input: {reason}") from e
        return named_outputs(self.spec, outputs)

    def run_requests(self, requests: list[Feeds]) -> list[Feeds | InputError]:
        """Run several requests as one batch (padding dynamic dims); a bad request gets its error back."""
        from xmr.export.runtime import run_batched

        return run_batched(requests, self.run)


class ReferenceRunner:
    """The ONNX reference evaluator with the `xmr` ops' numpy implementations (slow; any graph, any form)."""

    backend = "onnx.reference + xmr numpy ops"

    def __init__(self, path: str | Path, spec: ModelSpec):
        from xmr.models.ops.onnx_domain import reference_evaluator

        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX model {path} does not exist")
        self.session, self.spec = reference_evaluator(str(path)), spec

    def run(self, feeds: Feeds) -> Feeds:
        return named_outputs(
            self.spec, self.session.run(self.spec.output_names, check_feeds(self.spec, feeds))
        )


# backend name -> a runner of an exported file: (path, spec, threads) -> Runner; `threads` is the CPU threads
# it may use (0: the backend's default), ignored by a backend that has no such setting
BACKENDS: dict[str, Callable[[str | Path, ModelSpec, int], Runner]] = {
    "onnxruntime": lambda path, spec, threads: OnnxRunner(path, spec, threads),
    "reference": lambda path, spec, threads: ReferenceRunner(path, spec),
    "tensorrt": lambda path, spec, threads: _tensorrt_runner(path, spec),
}


def _tensorrt_runner(path: str | Path, spec: ModelSpec) -> Runner:
    """A TensorRT engine (`.plan`, or an `.onnx` built in FP32), imported only when one is asked for."""
    from xmr.export.trt_engine import TensorRTRunner

    return TensorRTRunner(path, spec)


# custom-op form of an exported graph -> the backend that runs it
FORM_BACKENDS = {"standard": "onnxruntime", "plugin": "reference"}


def runner_for(path: str | Path, spec: ModelSpec, custom_ops: str = "standard", threads: int = 1) -> Runner:
    """The runner for a graph of custom-op form `custom_ops`: ONNX Runtime for "standard", the reference
    evaluator for "plugin" (its `xmr` nodes exist in no stock runtime)."""
    if custom_ops not in FORM_BACKENDS:
        raise InputError(f"custom-ops form {custom_ops!r}; valid: {', '.join(FORM_BACKENDS)}")
    return BACKENDS[FORM_BACKENDS[custom_ops]](path, spec, threads)
