"""Prometheus metrics of the retraining controller (``mlops-retrain``, its own port, 9112 by default)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("mlops_retrain_decisions_total", "Triggering alerts decided, by action and the rail that held",
                    ["model", "action", "rail"])
RETRAINS = Counter("mlops_retrain_outcomes_total", "Retrains ended, by outcome (rollout_started, gate_blocked, "
                   "failed, stopped)", ["model", "outcome"])
RUNNING = Gauge("mlops_retrain_running", "1 while this controller trains a candidate", ["model"])
ALERT_TO_ROLLOUT = Histogram("mlops_retrain_alert_to_rollout_seconds", "From the alert's time to its candidate's "
                             "rollout starting", ["model"], buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))
ALERT_TO_PRODUCTION = Histogram("mlops_retrain_alert_to_production_seconds", "From the alert's time to its "
                                "candidate becoming Production (its rollout completed)", ["model"],
                                buckets=(60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400))
ROLLOUTS_ENDED = Counter("mlops_retrain_rollouts_ended_total", "Rollouts of retrained candidates ended, by result "
                         "(promoted, rolled_back, rollout_aborted)", ["model", "result"])
ALERTS_READ = Counter("mlops_retrain_alerts_read_total", "Alerts read from the topic (unreadable ones too)",
                      ["model"])
