from xmr.export.adapters import OnnxModel as TritonPythonModel  # noqa: F401
