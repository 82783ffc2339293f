"""The small shared core: typed settings, the feature contract, the ONNX contract, CLI helpers."""
