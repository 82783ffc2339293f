"""Train → track → register → promote: data, training and ONNX export, the model store, the registry, the pipeline."""
