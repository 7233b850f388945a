"""Run an ONNX graph in TensorRT: parse it with TensorRT's ONNX parser, build a float32 engine for the given
input shapes, run it on CUDA buffers (torch tensors), and return the outputs as numpy arrays.

Needs the `tensorrt` package and a CUDA device; nothing imports them at module level, so this file imports
anywhere. The custom ops' parity tests run their standard export form through it; the ops' TensorRT
plugins and the FP16/INT8 engine builder will build on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_engine(onnx_path: str | Path, shapes: dict[str, tuple[int, ...]]):
    """A float32 TensorRT engine of the graph at `onnx_path`, one optimisation profile fixed at `shapes`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = (
        0
        if int(trt.__version__.split(".")[0]) >= 10
        else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # full float32 matmuls: results comparable with PyTorch's
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, shapes[name], shapes[name], shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine of {onnx_path}")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_tensorrt(onnx_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Build an engine for the shapes of `feeds`, run it once, and return every output by name."""
    import tensorrt as trt
    import torch

    engine = build_engine(onnx_path, {name: array.shape for name, array in feeds.items()})
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    outputs = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            context.set_input_shape(name, tuple(feeds[name].shape))
        else:
            outputs.append(name)
    for name in outputs:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, buffer in buffers.items():
        context.set_tensor_address(name, buffer.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT failed to run {onnx_path}")
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}
