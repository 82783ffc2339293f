"""Prometheus metrics of the rollout controller (``mlops-rollout``, its own port, 9111 by default)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STEP = Gauge("mlops_rollout_step_percent", "The active rollout's candidate share, % (0: shadow; -1: none)", ["model"])
ACTIVE = Gauge("mlops_rollout_active", "1 while a rollout runs, by status (running, paused)", ["model", "status"])
STEP_AGE = Gauge("mlops_rollout_step_age_seconds", "Time since the current step began", ["model"])
STUCK = Gauge("mlops_rollout_stuck", "1 while the step has run past max_step_s without enough samples", ["model"])
DECISIONS = Counter("mlops_rollout_decisions_total", "Decisions applied by this controller", ["model", "action"])
LAST_DECISION = Gauge("mlops_rollout_last_decision_timestamp_seconds", "When this controller last applied one",
                      ["model"])
FAILURES = Counter("mlops_rollout_controller_failures_total", "Looks that failed (registry or Kafka), retried",
                   ["model"])
