"""Make ``prunekit`` importable from a source checkout and keep torch to two threads."""

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent  # the shared helpers (helpers, tinyjob, zoo) for tests in subfolders
ROOT = TESTS.parent
for path in (ROOT, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

torch.set_num_threads(2)
