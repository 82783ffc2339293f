"""The services a user would write instead of ours, run side by side with it by `python -m bench`.

Same request and response JSON, same Redis (Feast's keys), same ONNX file, same Kafka topic. They are the
bar, not straw men: `textbook` is the FastAPI app as the docs teach it, `tuned` is that app with every
obvious hand optimisation.
"""
