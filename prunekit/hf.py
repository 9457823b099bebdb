"""Deprecated alias of :mod:`prunekit.integrations.hf` (kept for one release).

Slim models saved by earlier releases name ``prunekit.hf`` in their loader file; they keep loading.
"""

import warnings

from prunekit.integrations.hf import *  # noqa: F401,F403
from prunekit.integrations.hf import __all__, from_pretrained, loader_class, save_pretrained  # noqa: F401

warnings.warn(
    "prunekit.hf moved to prunekit.integrations.hf; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
