"""Prometheus metrics of the drift consumer (served on its own port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DRIFT_SCORE = Gauge("mlops_drift_score", "Latest drift score of the topic-wide window",
                    ["model_name", "model_version", "feature", "metric"])
WINDOW_SAMPLES = Gauge("mlops_drift_window_samples", "Events in the topic-wide window",
                       ["model_name", "model_version", "feature"])
DRIFT_STATE = Gauge("mlops_drift_state", "0 ok, 1 warning, 2 critical", ["model_name", "model_version", "feature"])
EVENTS_CONSUMED = Counter("mlops_drift_events_consumed_total", "Prediction events reflected in the windows")
DEAD_LETTERS = Counter("mlops_drift_dead_letters_total", "Poison events sent to the dead-letter topic", ["reason"])
LATE_EVENTS = Counter("mlops_drift_late_events_total", "Events older than the window (consumed, not counted)")
DUPLICATES = Counter("mlops_drift_duplicate_events_total",
                     "Events whose request_id was already counted in the window (the log delivers at least once)")
ALERTS = Counter("mlops_drift_alerts_emitted_total", "Alerts published", ["severity", "status"])
CHANGE_POINTS = Counter("mlops_drift_change_points_total", "Changes of a feature's drift score level found by this "
                        "consumer's detector (streaming/change_points.py)", ["model_name", "model_version", "feature"])
CHANGE_POINT_EVENTS = Counter("mlops_drift_change_point_events_total", "drift_change_point events this consumer "
                              "published (one per feature per cooldown for the group)",
                              ["model_name", "model_version", "feature"])
LAG = Gauge("mlops_drift_consumer_lag", "Messages behind the end of the partition", ["partition"])
STATE_CELLS = Gauge("mlops_drift_state_cells", "Histogram cells held by this consumer (bounded by slots x bins)")

# Health through outages: the consumer never dies on a broker or Redis outage; these say what it is waiting for.
BROKER_CONNECTED = Gauge("mlops_drift_broker_connected", "1 while at least one Kafka broker connection is up")
CHECKPOINT_STORE_UP = Gauge("mlops_drift_checkpoint_store_up", "1 while the last Redis checkpoint call succeeded")
CHECKPOINT_FAILURES = Counter("mlops_drift_checkpoint_failures_total",
                              "Checkpoints that could not be saved (Redis down, dead letters not yet acknowledged)")
COMMIT_FAILURES = Counter("mlops_drift_commit_failures_total", "Kafka offset commits that failed (retried later)")
PAUSED = Gauge("mlops_drift_paused", "1 while (some) partitions are paused: a checkpoint cannot be saved or loaded")
ASSIGNED = Gauge("mlops_drift_assigned_partitions", "Partitions this consumer owns and reads")
REBALANCES = Counter("mlops_drift_rebalances_total", "Partition assignments and revocations", ["kind"])
STORE_RESETS = Counter("mlops_drift_checkpoint_store_resets_total",
                       "Times Redis had lost this consumer's checkpoints (flushed, restarted empty); re-seeded")
FENCED = Gauge("mlops_drift_fenced_partitions",
               "Partitions assigned to this consumer but claimed by another one in Redis: not read until revoked")

# The outcome join and realised quality (streaming/join.py), on the join consumer's own port.
QUALITY = Gauge("mlops_quality", "Quality of a model version over the time window: kind realised (joined pairs) "
                "or estimated (CBPE, every prediction)", ["model_name", "model_version", "kind", "metric"])
QUALITY_BASELINE = Gauge("mlops_quality_baseline", "The model version's holdout metrics from its training run",
                         ["model_name", "model_version", "metric"])
PERFORMANCE_ALERTS = Counter("mlops_quality_alerts_emitted_total", "Performance alerts published",
                             ["severity", "status"])
JOIN_READ = Counter("mlops_quality_events_total", "Events read by the join, by kind (prediction, outcome)", ["kind"])
JOIN_LAG = Gauge("mlops_quality_consumer_lag", "Messages behind the end of the partition", ["topic", "partition"])
JOIN_TOTALS = Gauge("mlops_quality_join_totals", "The whole group's join counts since its store began (from Redis): "
                    "joined, duplicate_predictions, duplicate_outcomes, outcomes_waiting", ["kind"])
JOIN_BROKER_CONNECTED = Gauge("mlops_quality_broker_connected", "1 while at least one Kafka broker connection is up")
JOIN_STORE_UP = Gauge("mlops_quality_checkpoint_store_up", "1 while the last Redis call of the join succeeded")
JOIN_CHECKPOINT_FAILURES = Counter("mlops_quality_checkpoint_failures_total", "Join saves that failed (retried)")
JOIN_COMMIT_FAILURES = Counter("mlops_quality_commit_failures_total", "Kafka offset commits that failed (retried)")
JOIN_PAUSED = Gauge("mlops_quality_paused", "1 while (some) partitions of the join are paused")
JOIN_ASSIGNED = Gauge("mlops_quality_assigned_partitions", "Partitions this join consumer owns and reads")
JOIN_FENCED = Gauge("mlops_quality_fenced_partitions", "Partitions assigned but claimed by another consumer")
JOIN_REBALANCES = Counter("mlops_quality_rebalances_total", "Partition assignments and revocations", ["kind"])
JOIN_STORE_RESETS = Counter("mlops_quality_checkpoint_store_resets_total", "Times Redis had lost the join's owner keys")
JOIN_DEAD_LETTERS = Counter("mlops_quality_dead_letters_total", "Unusable events sent to the dead-letter topic",
                            ["reason"])

# Row-level training/serving skew (streaming/skew.py), on the skew check's own port.
SKEW_SHARE = Gauge("mlops_skew_share", "Share of the last check's rows whose logged feature differs from the "
                   "offline store's at the prediction's time", ["feature"])
SKEW_MAX_ABS_DIFF = Gauge("mlops_skew_max_abs_diff", "Largest absolute difference in the last skew check", ["feature"])
SKEW_ROWS = Gauge("mlops_skew_rows", "Rows of the last skew check with an offline value", ["feature"])
SKEW_STATE = Gauge("mlops_skew_state", "1 while the feature is in skew (alert fired, not resolved)", ["feature"])
SKEW_LAST_CHECK = Gauge("mlops_skew_last_check_timestamp_seconds", "When the last skew check finished")
SKEW_CHECK_FAILURES = Counter("mlops_skew_check_failures_total", "Skew checks that could not run (retried next round)")
SKEW_ALERTS = Counter("mlops_skew_alerts_emitted_total", "Skew alerts published", ["status"])
