"""`mlops-drift`: run the streaming drift consumer, or follow the alerts topic.

    mlops-drift consume [--group G] [--rules rules.yaml] [--window-seconds S] [--slot-seconds S]
                        [--max-events N] [--metrics-port P] [--max-seconds S]
    mlops-drift alerts [--from-beginning] [--max-seconds S]
    mlops-drift report --out report.html [--window 3600] [--group G] [--model NAME[:VERSION]] [--rules R]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import redis
from prometheus_client import start_http_server

from mlops.settings import Settings
from streaming.consumer import ConsumerConfig, DriftConsumer, ProfileCache, load_profile_from_store
from streaming.rules import RulesError, RuleSet
from streaming.state_store import StateStore
from streaming.window import WindowSpec


def consume(args: argparse.Namespace, settings: Settings) -> int:
    try:
        rules_file = args.rules or settings.drift_rules_file
        rules = RuleSet.load(Path(rules_file)) if rules_file else RuleSet.default()
    except RulesError as exc:
        print(f"mlops-drift: {exc}", file=sys.stderr)
        return 2
    window = WindowSpec(
        slot_seconds=args.slot_seconds or settings.drift_slot_seconds,
        window_seconds=args.window_seconds or settings.drift_window_seconds,
        max_events=args.max_events or settings.drift_max_events,
    )
    config = ConsumerConfig(
        bootstrap=settings.kafka_bootstrap, topic=settings.predictions_topic, alerts_topic=settings.alerts_topic,
        dlq_topic=settings.dlq_topic, group_id=args.group or settings.drift_group_id, window=window,
        eval_interval_s=settings.drift_eval_interval_s, auto_offset_reset=settings.drift_auto_offset_reset,
        batch_size=settings.drift_batch_size, backoff_max_s=settings.drift_backoff_max_s,
        decision_threshold=settings.decision_threshold,
    )
    port = settings.drift_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        start_http_server(port, addr="127.0.0.1" if args.metrics_local else "0.0.0.0")
    # Timeouts so that a Redis that stops answering is an error to retry, never a hang.
    client = redis.Redis(host=settings.redis_host, port=settings.redis_port, socket_timeout=5,
                         socket_connect_timeout=2)
    consumer = DriftConsumer(config, rules, StateStore(client, config.group_id, config.topic),
                             ProfileCache(load_profile_from_store))
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    logging.info("consuming %s as group %s; window %s; metrics on :%s", config.topic, config.group_id, window, port)
    consumer.run(max_seconds=args.max_seconds)
    return 0


def follow_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "mlops-drift-alerts",
                         "enable.auto.commit": False})
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


def write_report(args: argparse.Namespace, settings: Settings) -> int:
    """The consumer group's live window as a self-contained HTML report (streaming/live_report.py)."""
    from streaming import live_report
    from streaming import report as html_report

    try:
        rules = RuleSet.load(Path(args.rules or settings.drift_rules_file)) \
            if (args.rules or settings.drift_rules_file) else RuleSet.default()
        client = redis.Redis(host=settings.redis_host, port=settings.redis_port, socket_timeout=5,
                             socket_connect_timeout=2)
        store = StateStore(client, args.group or settings.drift_group_id, settings.predictions_topic)
        spec = WindowSpec(slot_seconds=args.slot_seconds or settings.drift_slot_seconds, window_seconds=args.window)
        report = live_report.build(store, spec, ProfileCache(load_profile_from_store).get, rules, args.model)
        html_report.write_html(report, args.out)
    except (live_report.ReportError, RulesError) as exc:
        print(f"mlops-drift: {exc}", file=sys.stderr)
        return 2
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlops-drift", description="Streaming drift detection on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consume", help="run a drift consumer (add more with the same --group to scale out)")
    c.add_argument("--group")
    c.add_argument("--rules", type=Path)
    c.add_argument("--window-seconds", type=float)
    c.add_argument("--slot-seconds", type=float)
    c.add_argument("--max-events", type=int)
    c.add_argument("--metrics-port", type=int)
    c.add_argument("--metrics-local", action="store_true", help="serve metrics on 127.0.0.1 only")
    c.add_argument("--max-seconds", type=float, help="stop after this long (default: run until SIGTERM)")
    a = sub.add_parser("alerts", help="print drift alerts as they arrive")
    a.add_argument("--from-beginning", action="store_true")
    a.add_argument("--max-seconds", type=float)
    r = sub.add_parser("report", help="write the live window as a self-contained HTML drift report")
    r.add_argument("--out", type=Path, required=True, help="HTML file to write")
    r.add_argument("--window", type=float, default=3600.0, help="seconds of traffic to report (default 1 h)")
    r.add_argument("--slot-seconds", type=float, help="the consumers' slot width (default: the setting)")
    r.add_argument("--group")
    r.add_argument("--model", help="NAME or NAME:VERSION (default: the version with most events)")
    r.add_argument("--rules", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load()
    commands = {"consume": consume, "alerts": follow_alerts, "report": write_report}
    return commands[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
