"""The workflow verbs: ana, prune, finetune and the iterative loop, with their options.

- :mod:`prunekit.workflow.options`: every verb's config dataclass.
- :mod:`prunekit.workflow.ana`: sensitivity analysis (cached, resumable).
- :mod:`prunekit.workflow.fast_ana`: the fast analysis (cached activations, batched variants,
  early-stopped points, adaptive ratios).
- :mod:`prunekit.workflow.prune`: allocation to a MACs target or a metric threshold.
- :mod:`prunekit.workflow.structure`: whole blocks and experts to remove, for ``prune``.
- :mod:`prunekit.workflow.finetune`: the built-in training loop.
- :mod:`prunekit.workflow.iterative`: prune -> fine-tune steps with back-off.
- :mod:`prunekit.workflow.evaluation`: evaluators (accuracy, ...) and BatchNorm calibration.
- :mod:`prunekit.workflow.perplexity`: perplexity of causal language models at a stated length.
- :mod:`prunekit.workflow.distributed`: torchrun support.
- :mod:`prunekit.workflow.workspace`: the workspace folder and its artifact names.

Built on :mod:`prunekit.engine`; knows nothing of YAML or the command line.
"""
