"""prunekit: coarse-grained (channel) pruning for PyTorch models.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> pruner = Pruner(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = pruner.transform()  # doctest: +SKIP

The verbs ``prunekit.ana`` and ``prunekit.prune`` are the *functions*
(``prunekit.ana.ana`` and ``prunekit.prune.prune``); they shadow their modules' names as
attributes of the package, so import anything else from those modules with
``from prunekit.prune import PruneResult`` (or use the re-exports below), not with
``import prunekit.prune as m``.
"""

from importlib.metadata import PackageNotFoundError, version

from prunekit.ana import Sensitivity
from prunekit.ana import ana as ana
from prunekit.counting import Counts, count
from prunekit.criteria import CRITERIA, register_criterion
from prunekit.evaluation import accuracy, make_eval_fn
from prunekit.graph.groups import ChannelGroup
from prunekit.graph.trace import register_module_handler, trace
from prunekit.plan import PruningPlan
from prunekit.prune import PruneResult
from prunekit.prune import prune as prune  # the function shadows the module attribute (see above)
from prunekit.pruner import Pruner, max_error
from prunekit.slim import apply_spec, load_slim, register_updater, save_slim, slim_spec, to_slim
from prunekit.sparse import apply_plan, get_plan, load_sparse, remove_masks, save_sparse

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CRITERIA", "ChannelGroup", "Counts", "PruneResult", "Pruner", "PruningPlan", "Sensitivity", "accuracy",
    "ana", "apply_plan", "apply_spec", "count", "get_plan", "load_slim", "load_sparse", "make_eval_fn",
    "max_error", "prune", "register_criterion", "register_module_handler", "register_updater", "remove_masks",
    "save_slim", "save_sparse", "slim_spec", "to_slim", "trace",
]
