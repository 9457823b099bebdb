"""prunekit: coarse-grained (channel) pruning for PyTorch models.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> pruner = Pruner(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = pruner.transform()  # doctest: +SKIP

The layers, lowest first (each imports only from those before it; ``tests/test_layers.py``
checks it): :mod:`prunekit.graph` (tracing, channel groups), :mod:`prunekit.engine` (sparse and
slim models), :mod:`prunekit.workflow` (ana, prune, finetune, the iterative loop),
:mod:`prunekit.deploy` (export, bench), :mod:`prunekit.cli`. See ``docs/ARCHITECTURE.md``.
"""

from importlib.metadata import PackageNotFoundError, version

from prunekit.engine.counting import Counts, count
from prunekit.engine.criteria import CRITERIA, register_criterion
from prunekit.engine.equivalence import TOLERANCE, check_equivalence, max_error
from prunekit.engine.plan import PruningPlan
from prunekit.engine.pruner import Pruner
from prunekit.engine.slim import apply_spec, load_slim, register_updater, save_slim, slim_spec, to_slim
from prunekit.engine.sparse import apply_plan, get_plan, load_sparse, remove_masks, save_sparse
from prunekit.graph.groups import ChannelGroup
from prunekit.graph.trace import register_module_handler, trace
from prunekit.workflow.ana import Sensitivity, ana
from prunekit.workflow.evaluation import accuracy, make_eval_fn
from prunekit.workflow.options import AnaConfig, FinetuneConfig, IterativeConfig, PruneConfig
from prunekit.workflow.prune import PruneResult, prune

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CRITERIA",
    "TOLERANCE",
    "AnaConfig",
    "ChannelGroup",
    "Counts",
    "FinetuneConfig",
    "IterativeConfig",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "PruningPlan",
    "Sensitivity",
    "accuracy",
    "ana",
    "apply_plan",
    "apply_spec",
    "check_equivalence",
    "count",
    "get_plan",
    "load_slim",
    "load_sparse",
    "make_eval_fn",
    "max_error",
    "prune",
    "register_criterion",
    "register_module_handler",
    "register_updater",
    "remove_masks",
    "save_slim",
    "save_sparse",
    "slim_spec",
    "to_slim",
    "trace",
]
