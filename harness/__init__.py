"""What the demo, the tests and the benchmarks drive the stack with: a prepared workspace (data, model, Feast
repo), `bentoml serve` as a child process, readiness waits, load traffic, a local Prometheus, reading topics
back. Not part of the served product (the Bento leaves it out); `tools/` keeps the operator commands."""
