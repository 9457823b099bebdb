"""Deployment: export slim models (ONNX, TorchScript, ExportedProgram, safetensors) and time them."""
