"""Loads the compiled extension defensively: if it is missing or broken, one warning, and the
pure-PyTorch paths keep working (the ``cpu`` backend then reports itself unavailable)."""
from __future__ import annotations

import warnings

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    LOAD_ERROR = f"tlfast._C could not be imported ({exc}); reinstall with `pip install .`"
    warnings.warn(LOAD_ERROR, RuntimeWarning, stacklevel=2)

__all__ = ["_C", "LOAD_ERROR"]
