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


def verify_files(folder: Path) -> None:
    """Refuse to load a model whose artifact files differ from the record `xmr repo` wrote in the
    repository's serving.json (a flipped byte, a truncated gallery): InputError naming the file, before
    any of them is read. A repository without the record (older, or not written by `xmr repo`) passes."""
    from xmr.export.manifest import SERVING, verify_repository

    root = folder.parent.parent
    if (root / SERVING).is_file():
        verify_repository(root, folder.parent.name)


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


def collect(
    requests, spec: ModelSpec, check: Callable[[dict[str, np.ndarray]], object] | None = None
) -> tuple[list[int], list[dict[str, np.ndarray]], list]:
    """Read and check every request's inputs: (indices of the valid requests, their inputs, a response
    slot list holding each invalid request's error)."""
    slots: list = [None] * len(requests)
    ok, inputs = [], []
    for i, request in enumerate(requests):
        try:
            x = read_inputs(request, spec)
            if check is not None:
                check(x)
        except ValueError as e:  # InputError, and numpy's own complaints about a malformed tensor
            slots[i] = e
            continue
        inputs.append(x)
        ok.append(i)
    return ok, inputs, slots


def run_each(run: Callable[[list[dict[str, np.ndarray]]], list], inputs: list) -> list:
    """`run` on the whole batch; if it raises (a bug, not a bad input: those come back as results), on
    each request alone, so only the request that triggers it fails (INTERNAL), never its batch mates."""
    try:
        return run(inputs)
    except Exception as e:  # noqa: BLE001
        if len(inputs) == 1:
            return [e]
    results = []
    for x in inputs:
        try:
            results += run([x])
        except Exception as e:  # noqa: BLE001
            results.append(e)
    return results


def answer(
    requests,
    spec: ModelSpec,
    run: Callable[[list[dict[str, np.ndarray]]], list],
    check: Callable[[dict[str, np.ndarray]], object] | None = None,
) -> list:
    """One response per request: every request's inputs are read and checked (`check`, the model's
    boundary: dtype, finiteness, bounds) on their own; `run` gets the valid ones at once and returns a
    result (outputs by name, or that request's error) for each; invalid requests get their error."""
    ok, inputs, slots = collect(requests, spec, check)
    for i, result in zip(ok, run_each(run, inputs) if inputs else [], strict=True):
        slots[i] = result
    return [respond(r) for r in slots]
