"""Loads the compiled core (dejavu._C) and says what it was built with."""
from __future__ import annotations

from . import _C  # noqa: F401  (built by `pip install .`; import errors here mean a broken install)


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return bool(_C.cuda_compiled())


def cuda_usable() -> bool:
    """True when CUDA kernels are built in and a device is visible."""
    return cuda_compiled() and _C.cuda_device_count() > 0
