"""The small shared core every package may import (and which imports none of them): typed settings, the feature
contract, the ONNX contract, connections, the event formats, the drift reference profile and its statistics,
Feast offline reads, CLI helpers."""
