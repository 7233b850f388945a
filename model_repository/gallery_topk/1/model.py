from xmr.export.adapters import GalleryTopKModel as TritonPythonModel  # noqa: F401
