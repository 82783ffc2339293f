"""`mlops-drift`: run the streaming drift consumer or the outcome join, follow the alerts, read the quality.

    mlops-drift consume [--group G] [--rules rules.yaml] [--window-seconds S] [--slot-seconds S]
                        [--max-events N] [--metrics-port P] [--max-seconds S]
    mlops-drift join [--group G] [--metrics-port P] [--max-seconds S]
    mlops-drift quality [--group G] [--since SECONDS] [--version V] [--json]
    mlops-drift skew [--sample 500] [--tolerance 1e-6] [--threshold 0.01] [--json] [--publish]
    mlops-drift skew --every SECONDS [--metrics-port P] [--max-seconds S]
    mlops-drift alerts [--from-beginning] [--max-seconds S]
    mlops-drift report --out report.html [--window 3600] [--group G] [--model NAME[:VERSION]] [--rules R]

Exit codes: 0 done (stopped by SIGTERM/SIGINT or --max-seconds), 2 bad usage, input or setting, or a metrics port
that cannot be bound (one line on stderr, never a traceback). Outages of Kafka or Redis are not errors: the
consumer waits them out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import pydantic
import redis
from prometheus_client import start_http_server

from mlops.cli_args import OneLineParser
from mlops.connections import kafka_config, redis_options
from mlops.settings import ENV_PREFIX, Settings, SettingsError
from streaming import metrics
from streaming.change_points import ChangePointConfig
from streaming.consumer import ConsumerConfig, DriftConsumer
from streaming.join import BASELINE_METRICS, JoinConfig, JoinConsumer, window_metrics
from streaming.join_store import JoinSettings, JoinStore
from streaming.model_files import (
    ProfileCache,
    load_calibration_from_store,
    load_holdout_metrics,
    load_profile_from_store,
)
from streaming.rules import RulesError, RuleSet
from streaming.state_store import StateStore
from streaming.window import WindowSpec


class StartupError(Exception):
    """A bad option, setting or environment the user must fix: one line on stderr, exit code 2."""


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (NaN would silently switch a check off, inf never ends)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def share(text: str) -> float:
    """argparse type: a share strictly between 0 and 1."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (0: no metrics), got {text!r}")
    return value


def serve_metrics(port: int, addr: str, from_flag: bool) -> None:
    """The Prometheus endpoint, or a StartupError saying which port and how to choose another."""
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        source = "--metrics-port" if from_flag else f"{ENV_PREFIX}DRIFT_METRICS_PORT"
        raise StartupError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; choose another "
                           f"--metrics-port (from {source}; 0 turns metrics off)") from None


def change_point_config(settings: Settings, window: WindowSpec) -> ChangePointConfig:
    try:
        return ChangePointConfig(
            detector=settings.drift_change_detector, metric=settings.drift_change_metric,
            min_instances=settings.drift_change_min_evaluations, threshold=settings.drift_change_threshold,
            cooldown_s=settings.drift_change_cooldown_s or window.window_seconds)
    except ValueError as exc:
        raise StartupError(f"{ENV_PREFIX}DRIFT_CHANGE_*: {exc}") from None


def consume(args: argparse.Namespace, settings: Settings) -> int:
    try:
        rules_file = args.rules or settings.drift_rules_file
        rules = RuleSet.load(Path(rules_file)) if rules_file else RuleSet.default()
    except RulesError as exc:
        raise StartupError(str(exc)) from None
    window = WindowSpec(
        slot_seconds=settings.drift_slot_seconds if args.slot_seconds is None else args.slot_seconds,
        window_seconds=settings.drift_window_seconds if args.window_seconds is None else args.window_seconds,
        max_events=settings.drift_max_events if args.max_events is None else args.max_events,
    )
    if window.window_seconds < window.slot_seconds:
        raise StartupError(f"--window-seconds ({window.window_seconds:g}) must be at least --slot-seconds "
                           f"({window.slot_seconds:g})")
    config = ConsumerConfig(
        bootstrap=kafka_config(settings), topic=settings.predictions_topic, alerts_topic=settings.alerts_topic,
        dlq_topic=settings.dlq_topic, group_id=args.group or settings.drift_group_id, window=window,
        eval_interval_s=settings.drift_eval_interval_s, auto_offset_reset=settings.drift_auto_offset_reset,
        batch_size=settings.drift_batch_size, backoff_max_s=settings.drift_backoff_max_s,
        decision_threshold=settings.decision_threshold, change_points=change_point_config(settings, window),
    )
    port = settings.drift_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        serve_metrics(port, "127.0.0.1" if args.metrics_local else settings.drift_metrics_host,
                      from_flag=args.metrics_port is not None)
    # Timeouts so that a Redis that stops answering is an error to retry, never a hang.
    client = redis.Redis(**redis_options(settings), socket_timeout=5, socket_connect_timeout=2)
    consumer = DriftConsumer(config, rules, StateStore(client, config.group_id, config.topic),
                             ProfileCache(load_profile_from_store))
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    logging.info("consuming %s as group %s; window %s; metrics on :%s", config.topic, config.group_id, window, port)
    consumer.run(max_seconds=args.max_seconds)
    return 0


def join_settings(settings: Settings) -> JoinSettings:
    return JoinSettings(horizon_s=settings.quality_horizon_s, slot_s=settings.quality_slot_seconds,
                        window_slots=max(1, settings.quality_window_seconds // settings.quality_slot_seconds),
                        threshold=settings.decision_threshold)


def join(args: argparse.Namespace, settings: Settings) -> int:
    """The outcome join (streaming/join.py): add more with the same --group to scale out."""
    config = JoinConfig(bootstrap=kafka_config(settings), predictions_topic=settings.predictions_topic,
                        outcomes_topic=settings.outcomes_topic, dlq_topic=settings.outcomes_dlq_topic,
                        group_id=args.group or settings.quality_group_id, join=join_settings(settings),
                        alerts_topic=settings.alerts_topic, drop=settings.quality_drop,
                        min_labels=settings.quality_min_labels, min_predictions=settings.quality_min_predictions,
                        eval_interval_s=settings.quality_eval_interval_s, batch_size=settings.drift_batch_size)
    port = settings.quality_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        serve_metrics(port, "127.0.0.1" if args.metrics_local else settings.drift_metrics_host,
                      from_flag=args.metrics_port is not None)
    client = redis.Redis(**redis_options(settings), socket_timeout=5, socket_connect_timeout=2)
    consumer = JoinConsumer(config, JoinStore(client, config.group_id, config.join),
                            ProfileCache(load_calibration_from_store), ProfileCache(load_holdout_metrics))
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    logging.info("joining %s to %s as group %s; horizon %.0f s; metrics on :%s", config.outcomes_topic,
                 config.predictions_topic, config.group_id, config.join.horizon_s, port)
    consumer.run(max_seconds=args.max_seconds)
    return 0


QUALITY_COLUMNS = (("realised", "labelled"), ("realised", "label_coverage"), ("realised", "accuracy"),
                   ("estimated", "accuracy"), ("holdout", "accuracy"), ("realised", "auc"), ("estimated", "auc"),
                   ("holdout", "auc"), ("realised", "f1"),
                   ("realised", "brier"), ("realised", "ece"), ("realised", "label_delay_p50_s"), ("skew", "share"))


def show_quality(args: argparse.Namespace, settings: Settings) -> int:
    """Realised and estimated quality per model version over the last --since seconds, from the join's store,
    beside the version's holdout metrics and the latest skew check's share."""
    from streaming import skew

    s = join_settings(settings)
    since = args.since or settings.quality_window_seconds
    first_slot = int((time.time() - since) // s.slot_s) + 1
    client = redis.Redis(**redis_options(settings), socket_timeout=5, socket_connect_timeout=2)
    try:
        slots = JoinStore(client, args.group or settings.quality_group_id, s).slots(first_slot)
        last = skew.latest(client, settings.predictions_topic)
    except redis.RedisError as exc:
        print(f"mlops-drift: cannot read the join's state from Redis at {settings.redis_address}: {exc}",
              file=sys.stderr)
        return 2
    table = window_metrics(slots, s.bins)
    for version, kinds in table.items():
        name, _, label = version.partition(":")
        holdout = load_holdout_metrics(name, label) or {}  # the version's own training-run metrics
        kinds["holdout"] = {metric: holdout.get(metric) for metric in BASELINE_METRICS}
        kinds["skew"] = {"share": last.versions.get(version) if last else None,  # largest share over features
                         "checked_at": last.checked_at if last else None}
    if args.version:
        table = {k: v for k, v in table.items() if args.version in (k, k.split(":", 1)[1])}
    if args.json:
        print(json.dumps({"since_s": since, "versions": table}, sort_keys=True))
        return 0
    if not table:
        print(f"no predictions in the last {since:g} s")
        return 0
    names = [{"estimated": "est ", "holdout": "holdout ", "skew": "skew "}.get(kind, "") + metric
             for kind, metric in QUALITY_COLUMNS]
    print("version".ljust(22) + "predictions".rjust(12) + "".join(n.rjust(max(10, len(n) + 2)) for n in names))
    for version, kinds in table.items():
        cells = []
        for (kind, metric), name in zip(QUALITY_COLUMNS, names, strict=True):
            value = kinds[kind].get(metric)
            text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) and not metric.endswith("_s")
                                              else f"{value:g}")
            cells.append(text.rjust(max(10, len(name) + 2)))
        print(version.ljust(22) + f"{kinds['realised']['predictions']:>12}" + "".join(cells))
    if last is not None:
        age = time.time() - last.checked_at
        print(f"skew: largest share of rows differing from the offline store, check of {age:.0f} s ago "
              f"({last.sampled} predictions; skewed: {', '.join(last.skewed) or 'none'})")
    return 0


def show_skew(args: argparse.Namespace, settings: Settings) -> int:
    """Row-level training/serving skew of the newest predictions (streaming/skew.py); exit 1 when skewed. With
    --publish the check is recorded (Redis, metrics, alerts); --every repeats it until stopped."""
    from streaming import skew

    sample = args.sample or settings.skew_sample
    tolerance = settings.skew_tolerance if args.tolerance is None else args.tolerance
    threshold = args.threshold or settings.skew_threshold
    recorder = None
    if args.publish or args.every:
        client = redis.Redis(**redis_options(settings), socket_timeout=5, socket_connect_timeout=2)
        recorder = skew.SkewRecorder(client, settings.predictions_topic, kafka_config(settings),
                                     settings.alerts_topic, settings.skew_min_rows)

    def one_check() -> skew.SkewCheck:
        result = skew.check(kafka_config(settings), settings.predictions_topic, settings.feature_repo,
                            settings.redis_address, sample, tolerance, threshold)
        if recorder is not None:
            recorder.record(result)
        return result

    if args.every:
        port = settings.skew_metrics_port if args.metrics_port is None else args.metrics_port
        if port:
            serve_metrics(port, "127.0.0.1" if args.metrics_local else settings.drift_metrics_host,
                          from_flag=args.metrics_port is not None)
        stop = _stop_event()
        deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                result = one_check()
                logging.info("skew check: %s rows, skewed: %s", result.sampled, ", ".join(result.skewed) or "none")
            except (skew.SkewError, redis.RedisError) as exc:  # an outage: try again next round
                metrics.SKEW_CHECK_FAILURES.inc()
                logging.warning("skew check failed: %s", exc)
            except Exception:  # a bug must not stop the checks (the failures metric and the log say so)
                metrics.SKEW_CHECK_FAILURES.inc()
                logging.exception("skew check failed")
            stop.wait(args.every if deadline is None else max(0.0, min(args.every, deadline - time.monotonic())))
        return 0
    try:
        result = one_check()
    except skew.SkewError as exc:
        print(f"mlops-drift: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"mlops-drift: cannot record the check in Redis at {settings.redis_address}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print(f"{result.sampled} predictions against the offline store at their time (tolerance {tolerance:g}):")
        print(f"{'feature':<24}{'rows':>8}{'differing':>11}{'share':>9}{'max abs diff':>15}{'no offline value':>18}")
        for f in result.features:
            print(f"{f.feature:<24}{f.rows:>8}{f.differing:>11}{f.share:>9.4f}{f.max_abs_diff:>15.6g}"
                  f"{f.missing_offline:>18}")
        print(f"skewed (share > {threshold:g}): {', '.join(result.skewed) or 'none'}")
    return 1 if result.skewed else 0


def _stop_event() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def follow_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

    consumer = Consumer({**kafka_config(settings), "group.id": "mlops-drift-alerts", "enable.auto.commit": False})
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    try:
        topic = consumer.list_topics(settings.alerts_topic, timeout=10).topics[settings.alerts_topic]
        start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
        consumer.assign([TopicPartition(settings.alerts_topic, p, start) for p in topic.partitions])
        while deadline is None or time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is None:
                    print(json.dumps(json.loads(message.value()), sort_keys=True), flush=True)
    except KafkaException as exc:
        print(f"mlops-drift: cannot read {settings.alerts_topic} at {settings.kafka_bootstrap}: {exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def skew_section(client: redis.Redis, topic: str):
    """The latest recorded skew check (`mlops-drift skew --publish`/`--every`) for the report, if any."""
    from datetime import UTC, datetime

    from streaming import report as html_report
    from streaming import skew

    last = skew.latest(client, topic)
    if last is None:
        return None
    return html_report.SkewSection(datetime.fromtimestamp(last.checked_at, UTC), last.sampled, last.tolerance,
                                   last.threshold, [vars(f) for f in last.features])


def write_report(args: argparse.Namespace, settings: Settings) -> int:
    """The consumer group's live window as a self-contained HTML report (streaming/live_report.py)."""
    from streaming import live_report
    from streaming import report as html_report

    try:
        rules = RuleSet.load(Path(args.rules or settings.drift_rules_file)) \
            if (args.rules or settings.drift_rules_file) else RuleSet.default()
        client = redis.Redis(**redis_options(settings), socket_timeout=5, socket_connect_timeout=2)
        store = StateStore(client, args.group or settings.drift_group_id, settings.predictions_topic)
        spec = WindowSpec(slot_seconds=args.slot_seconds or settings.drift_slot_seconds, window_seconds=args.window)
        report = live_report.build(store, spec, ProfileCache(load_profile_from_store).get, rules, args.model,
                                   skew=skew_section(client, settings.predictions_topic))
        html_report.write_html(report, args.out)
    except (live_report.ReportError, RulesError) as exc:
        raise StartupError(str(exc)) from None
    except redis.RedisError as exc:
        print(f"mlops-drift: cannot read the checkpoints from Redis at {settings.redis_address}: {exc}",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mlops-drift: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    worst = max((c.verdict for c in report.columns), key=html_report.SEVERITY_RANK.__getitem__, default="ok")
    print(f"wrote {args.out}: {report.model_name}:{report.model_version}, {len(report.columns)} columns, "
          f"worst verdict {worst}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="mlops-drift", description="Streaming drift detection on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consume", help="run a drift consumer (add more with the same --group to scale out)")
    c.add_argument("--group")
    c.add_argument("--rules", type=Path)
    c.add_argument("--window-seconds", type=positive_float)
    c.add_argument("--slot-seconds", type=positive_float)
    c.add_argument("--max-events", type=positive_int)
    c.add_argument("--metrics-port", type=port_number, help="Prometheus port (0: none; default 9108)")
    c.add_argument("--metrics-local", action="store_true",
                   help="serve metrics on 127.0.0.1 whatever MLOPS_DRIFT_METRICS_HOST says (the default already)")
    c.add_argument("--max-seconds", type=positive_float, help="stop after this long (default: run until SIGTERM)")
    j = sub.add_parser("join", help="run an outcome join consumer (add more with the same --group to scale out)")
    j.add_argument("--group")
    j.add_argument("--metrics-port", type=port_number, help="Prometheus port (0: none; default 9109)")
    j.add_argument("--metrics-local", action="store_true", help="serve metrics on 127.0.0.1")
    j.add_argument("--max-seconds", type=positive_float, help="stop after this long (default: run until SIGTERM)")
    q = sub.add_parser("quality", help="realised quality per model version, from the join's state")
    q.add_argument("--group")
    q.add_argument("--since", type=positive_float, help="seconds back (default: MLOPS_QUALITY_WINDOW_SECONDS)")
    q.add_argument("--version", help="only this model version")
    q.add_argument("--json", action="store_true")
    k = sub.add_parser("skew", help="row-level training/serving skew of the newest predictions (exit 1: skewed)")
    k.add_argument("--sample", type=positive_int, help="newest prediction events to check (default 500)")
    k.add_argument("--tolerance", type=positive_float, help="relative difference counted as skew (default 1e-6)")
    k.add_argument("--threshold", type=share, help="share of differing rows that is skew (default 0.01)")
    k.add_argument("--json", action="store_true")
    k.add_argument("--publish", action="store_true",
                   help="record the check: latest result in Redis, metrics, skew alerts on the alerts topic")
    k.add_argument("--every", type=positive_float, help="check (and publish) every SECONDS until stopped")
    k.add_argument("--metrics-port", type=port_number, help="Prometheus port with --every (0: none; default 9110)")
    k.add_argument("--metrics-local", action="store_true", help="serve metrics on 127.0.0.1")
    k.add_argument("--max-seconds", type=positive_float, help="with --every: stop after this long")
    a = sub.add_parser("alerts", help="print drift alerts as they arrive")
    a.add_argument("--from-beginning", action="store_true")
    a.add_argument("--max-seconds", type=positive_float)
    r = sub.add_parser("report", help="write the live window as a self-contained HTML drift report")
    r.add_argument("--out", type=Path, required=True, help="HTML file to write")
    r.add_argument("--window", type=positive_float, default=3600.0, help="seconds of traffic to report (default 1 h)")
    r.add_argument("--slot-seconds", type=positive_float, help="the consumers' slot width (default: the setting)")
    r.add_argument("--group")
    r.add_argument("--model", help="NAME or NAME:VERSION (default: the version with most events)")
    r.add_argument("--rules", type=Path)
    return parser.parse_args(argv)


def load_settings() -> Settings:
    try:
        return Settings.load()
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        name = f"{ENV_PREFIX}{'_'.join(str(part) for part in error['loc']).upper()}"
        raise StartupError(f"invalid setting {name}={error.get('input')!r}: {error['msg']}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # usage mistakes: one line and exit 2 (OneLineParser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"consume": consume, "join": join, "quality": show_quality, "skew": show_skew,
                "alerts": follow_alerts, "report": write_report}
    try:
        return commands[args.command](args, load_settings())
    except (StartupError, SettingsError) as exc:
        print(f"mlops-drift: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
