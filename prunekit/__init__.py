"""prunekit: coarse-grained (channel) pruning for PyTorch models.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> pruner = Pruner(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = pruner.transform()  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from prunekit.counting import Counts, count
from prunekit.criteria import CRITERIA, register_criterion
from prunekit.graph.groups import ChannelGroup
from prunekit.graph.trace import register_module_handler, trace
from prunekit.plan import PruningPlan
from prunekit.pruner import Pruner, max_error
from prunekit.slim import apply_spec, load_slim, register_updater, save_slim, slim_spec, to_slim
from prunekit.sparse import apply_plan, get_plan, load_sparse, remove_masks, save_sparse

try:
    __version__ = version("prunekit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "CRITERIA", "ChannelGroup", "Counts", "Pruner", "PruningPlan", "apply_plan", "apply_spec",
    "count", "get_plan", "load_slim", "load_sparse", "max_error", "register_criterion",
    "register_module_handler", "register_updater", "remove_masks", "save_slim", "save_sparse",
    "slim_spec", "to_slim", "trace",
]
