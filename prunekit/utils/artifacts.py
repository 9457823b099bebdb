"""The file names of every artifact prunekit writes: one home, so that writers and readers agree.

A workspace (:class:`prunekit.workflow.workspace.Workspace`) holds the stage results; a saved
model directory (:func:`prunekit.save_sparse`, :func:`prunekit.save_slim`) holds the weights
and the plan or spec that rebuilds the architecture. ``docs/ARCHITECTURE.md`` says which stage
writes and reads each.

Example:
    >>> from prunekit.utils import artifacts
    >>> artifacts.SENSITIVITY, artifacts.WEIGHTS
    ('sensitivity.json', 'model.safetensors')
"""

from __future__ import annotations

#: ana's measured points, resumable (``ana.rank<i>.json`` per rank or worker)
ANA = "ana.json"
#: the sensitivity curves ana derives from its points (read by prune, run, the report)
SENSITIVITY = "sensitivity.json"
#: the curves as a plot
SENSITIVITY_PLOT = "sensitivity.png"
#: the channels a prune step removes (also in a saved sparse model's directory)
PLAN = "plan.json"
#: what ``prunekit prune`` did (counts, ratios, notes)
PRUNE = "prune.json"
#: what ``prunekit finetune`` did (epochs, metrics)
FINETUNE = "finetune.json"
#: the iterative loop's state (steps done, the accepted attempts), resumable
ITERATIVE = "iterative.json"
#: the iterative loop's result
SUMMARY = "summary.json"
#: ``prunekit demo``'s result
DEMO = "demo.json"
#: the job's configuration, written after a successful verb
CONFIG = "config.yaml"
#: the HTML report
REPORT = "report.html"
#: model weights (sparse or slim model directories, the safetensors export)
WEIGHTS = "model.safetensors"
#: the layer shapes that rebuild a slim model from the original factory
SPEC = "spec.json"
#: what an export wrote (formats, files, checks)
EXPORT_MANIFEST = "export.json"
#: the best epoch's weights of a fine-tune
BEST = "best.pt"
#: the last epoch's training state of a fine-tune (resume)
CHECKPOINT = "checkpoint.pt"
#: the iterative loop's per-step directories
STEPS = "steps"

__all__ = [
    "ANA", "SENSITIVITY", "SENSITIVITY_PLOT", "PLAN", "PRUNE", "FINETUNE", "ITERATIVE", "SUMMARY", "DEMO",
    "CONFIG", "REPORT", "WEIGHTS", "SPEC", "EXPORT_MANIFEST", "BEST", "CHECKPOINT", "STEPS",
]  # fmt: skip
