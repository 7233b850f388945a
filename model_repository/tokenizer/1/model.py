from xmr.export.adapters import TokenizerModel as TritonPythonModel  # noqa: F401
