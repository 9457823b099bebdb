"""The engine: from channel groups to sparse and slim models, importable with torch alone.

- :mod:`prunekit.engine.pruner`: :class:`~prunekit.engine.pruner.Pruner`, the entry point.
- :mod:`prunekit.engine.plan`: the pruning plan (which channels of which group go).
- :mod:`prunekit.engine.sparse`: masks that hold pruned channels at zero (same shapes).
- :mod:`prunekit.engine.slim`: the slim model (channels removed) and its spec.
- :mod:`prunekit.engine.equivalence`: the slim == sparse check and its tolerance.
- :mod:`prunekit.engine.criteria`: channel importance criteria (a registry).
- :mod:`prunekit.engine.calibration`: layer-input statistics of calibration batches, bias compensation.
- :mod:`prunekit.engine.depth`: removable residual blocks / layers, their influence, their removal.
- :mod:`prunekit.engine.experts`: mixture-of-experts layers: expert usage, removal, router masks.
- :mod:`prunekit.engine.counting`: MACs and parameters.
- :mod:`prunekit.engine.allocate`: per-group ratios for a MACs target.
- :mod:`prunekit.engine.prepare`: module substitutions before tracing.

Nothing here knows about data, training, files of a workspace or the CLI.
"""
