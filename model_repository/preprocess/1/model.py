from xmr.export.adapters import PreprocessModel as TritonPythonModel  # noqa: F401
