"""Layers that slim models may need when pruning changes what the original class allows."""

from prunekit.nn.attention import PrunedMultiheadAttention

__all__ = ["PrunedMultiheadAttention"]
