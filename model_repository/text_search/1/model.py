from xmr.export.adapters import TextSearchModel as TritonPythonModel  # noqa: F401
