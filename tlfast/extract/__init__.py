"""Stage one of the pipeline: batched feature extraction (``tlfast.Extractor``).

Imports only torch and numpy; transformers, onnxruntime, PIL and the model packages are imported
when an extractor needs them (``pip install 'tlfast[extract]'``).
"""
from .extractor import PRETRAINED, Extractor

__all__ = ["Extractor", "PRETRAINED"]
