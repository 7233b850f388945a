"""Glue between Triton's python backend and `runtime.py`, shared by every model of `adapters.py`.

`triton_python_backend_utils` exists only inside the backend stub, so it is imported lazily here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xmr.export.iospec import ModelSpec
from xmr.models.errors import InputError


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def setup(args: dict) -> tuple[Path, dict[str, str]]:
    """(this model version's folder, the config's `parameters` as strings) from `initialize`'s args."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    return Path(args["model_repository"]) / args["model_version"], params


def spec_from(folder: Path) -> ModelSpec:
    """The I/O spec written next to the model by `xmr repo` (spec.json)."""
    return ModelSpec.from_dict(json.loads((folder / "spec.json").read_text()))


def read_inputs(request, spec: ModelSpec) -> dict[str, np.ndarray]:
    pb_utils = _pb()
    out = {}
    for t in spec.inputs:
        tensor = pb_utils.get_input_tensor_by_name(request, t.name)
        if tensor is None:
            raise InputError(f"missing input {t.name!r}")
        out[t.name] = tensor.as_numpy()
    return out


def respond(result: dict[str, np.ndarray] | Exception):
    """An InferenceResponse with the outputs, or a per-request error naming what was wrong."""
    pb_utils = _pb()
    if isinstance(result, Exception):
        # bad input (InputError is a ValueError) is the client's error: INVALID_ARG, gRPC INVALID_ARGUMENT
        invalid = isinstance(result, ValueError)
        code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result), code))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in result.items()]
    )


def collect(requests, spec: ModelSpec) -> tuple[list[int], list[dict[str, np.ndarray]], list]:
    """Read every request's inputs: (indices of readable requests, their inputs, a response slot list)."""
    slots: list = [None] * len(requests)
    ok, inputs = [], []
    for i, request in enumerate(requests):
        try:
            inputs.append(read_inputs(request, spec))
            ok.append(i)
        except InputError as e:
            slots[i] = e
    return ok, inputs, slots


def answer(requests, spec: ModelSpec, run: Callable[[list[dict[str, np.ndarray]]], list]) -> list:
    """One response per request: `run` gets the inputs of every readable request at once and returns a
    result (outputs by name, or that request's error) for each; unreadable requests get their read error."""
    ok, inputs, slots = collect(requests, spec)
    for i, result in zip(ok, run(inputs) if inputs else [], strict=True):
        slots[i] = result
    return [respond(r) for r in slots]
