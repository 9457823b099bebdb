"""The torch-only graph core: trace a model, label its channels, build channel groups.

Nothing here knows about data, training or the CLI.

- :mod:`prunekit.graph.trace`: the tracer (a torch-function mode) and rule registries.
- :mod:`prunekit.graph.rules`: rules for parameter-free ops (elementwise, layout, reductions).
- :mod:`prunekit.graph.layers`: rules for ops with parameters (conv, linear, norms, attention).
- :mod:`prunekit.graph.labels`: channel ids and their union-find.
- :mod:`prunekit.graph.groups`: channel groups built from the recorded coupling.
"""

from prunekit.graph.groups import ChannelGroup, Member, build_groups
from prunekit.graph.trace import Tracer, register_module_handler, register_rule

# ``trace`` stays a submodule here (``prunekit.trace`` is the function)
__all__ = ["ChannelGroup", "Member", "Tracer", "build_groups", "register_module_handler", "register_rule"]
