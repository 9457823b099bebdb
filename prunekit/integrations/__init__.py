"""Model libraries with their own conventions: Hugging Face transformers, torchvision Swin.

Loaded lazily by the engine's registries (by class path), so ``import prunekit`` needs neither.
"""
