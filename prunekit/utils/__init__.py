"""Small helpers every layer shares, one home each: atomic files, text tables, object references, devices.

The lowest layer with :mod:`prunekit.graph`: imports only the standard library and torch.
"""
