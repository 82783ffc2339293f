"""`registry`: register, promote, list, compare, roll back and audit model versions on MLflow's registry.

    registry register --name N --version V [--model-file m.onnx] [--metrics '{..}'] [--params '{..}'] [--stage S]
    registry promote  --name N --version V --stage production|staging|archived [--reason R]
    registry list     [--name N] [--stage production]
    registry compare  --name N --versions V1 V2 [...]
    registry rollback --name N [--to VERSION] [--reason R]
    registry history  --name N [--trace ALERT|RUN|VERSION|ROLLOUT]
    registry retrain  decisions|reset --name N   (the retraining controller's record, lifecycle/retrain)
    registry rollout  start|status|history|pause|resume|abort --name N ...   (lifecycle/rollout/cli.py)
    registry experiment plan|start|status|conclude ...

Every verb takes ``--json``. ``--mlflow-uri`` (or ``--registry``) names the MLflow backend: a server URL, a
database URI, or a path taken as an embedded SQLite file; default ``MLOPS_MLFLOW_URI``, else the embedded store.
Both options go before or after the verb. Only ``register --model-file`` creates a store; the other verbs refuse
one that does not exist (the default is relative to the current folder). Exit codes: 0 done, 1 refused (the
message says why), 2 bad usage or input, including a backend that cannot be used (unreachable, missing, not an
MLflow store).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from lifecycle import model_store
from lifecycle.cli_backend import BackendUnavailable, fail_fast, open_backend
from lifecycle.onnx_export import InvalidModelError, check_servable
from lifecycle.registry import Registry, RegistryError, check_metrics, normalize_stage, register_stage
from lifecycle.rollout import cli as rollout_cli
from lifecycle.tracking import TrackingError
from mlops.cli_args import OneLineParser, settings_error
from mlops.schema import MODEL_FEATURES
from mlops.settings import Settings


class UsageError(ValueError):
    pass


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def json_arg(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # NaN, Infinity: Python's extensions, not JSON
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def non_finite(value: Any) -> float | None:
    """The first number in a JSON value that is not finite (``1e999`` is valid JSON that parses as infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found = non_finite(item)
        if found is not None:
            return found
    return None


def check_params(params: dict) -> None:
    """Params may be any JSON, but their numbers are finite, like metrics: an infinity stored as a param would
    be compared and shown as if it were a setting."""
    for key, value in params.items():
        bad = non_finite(value)
        if bad is not None:
            wanted = "be a finite number" if isinstance(value, float) else "hold only finite numbers"
            raise UsageError(f"--params: param {key!r} must {wanted}, not {bad!r}")


def emit(args: argparse.Namespace, payload: Any, text: str) -> int:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before the backend is opened: a refused command writes nothing (no label used up)."""
    try:
        if getattr(args, "name", None) is not None:
            model_store.check_name(args.name)
        versions = [getattr(args, "version", None), getattr(args, "to", None), *(getattr(args, "versions", None) or [])]
        for version in versions:
            if version is not None:
                model_store.check_version(version)
    except model_store.ModelStoreError as exc:
        raise UsageError(str(exc)) from None
    if args.command == "list" and args.stage:
        normalize_stage(args.stage)
    if args.command == "promote":
        normalize_stage(args.stage)
    if args.command == "compare" and len(args.versions) < 2:
        raise UsageError("--versions needs at least two versions")
    try:
        rollout_cli.check(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.command == "register":
        args.stage = register_stage(args.stage)
        args.metrics, args.params = json_arg(args.metrics, "--metrics"), json_arg(args.params, "--params")
        try:
            check_metrics(args.metrics)
        except RegistryError as exc:
            raise UsageError(f"--metrics: {exc}") from None
        check_params(args.params)
        args.content = model_content(Path(args.model_file)) if args.model_file else None


def model_content(path: Path) -> bytes:
    """The bytes of a servable ONNX model, or a UsageError saying why not."""
    if not path.is_file():
        raise UsageError(f"--model-file {path} does not exist")
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--model-file {path}: {exc.strerror}") from None
    try:
        check_servable(content, len(MODEL_FEATURES))
    except InvalidModelError as exc:
        raise UsageError(f"--model-file {path}: {exc}") from None
    return content


def register(reg: Registry, args: argparse.Namespace) -> int:
    """Arguments were checked by :func:`check_args` (stage, metrics and the model file before any write)."""
    if args.content is not None:
        meta = {"metrics": args.metrics, "params": args.params, "features": list(MODEL_FEATURES),
                "source_file": str(args.model_file)}
        model_store.save(args.name, args.version, args.content, meta, backend=reg.backend)
    elif not model_store.exists(args.name, args.version, reg.backend):
        raise UsageError(f"no artifact for {args.name}:{args.version} in MLflow ({reg.uri}): train it first "
                         "(mlops-train / pipeline run) or pass --model-file")
    version = reg.register(args.name, args.version, args.metrics or None, args.params or None, stage=args.stage)
    return emit(args, version.to_dict(), f"registered {version.name}:{version.version} in {version.stage} "
                f"(MLflow model version {version.mlflow_version})")


def show_list(reg: Registry, args: argparse.Namespace) -> int:
    versions = reg.list(args.name, args.stage)
    if args.json:
        return emit(args, [v.to_dict() for v in versions], "")
    print(f"{'name':<20} {'version':<10} {'stage':<11} {'auc':>7} {'accuracy':>9}  {'aliases':<12} created")
    for v in versions:
        auc, acc = v.metrics.get("auc"), v.metrics.get("accuracy")
        print(f"{v.name:<20} {v.version:<10} {v.stage:<11} {fmt(auc):>7} {fmt(acc):>9}  "
              f"{','.join(v.aliases) or '-':<12} {v.created_at[:19]}")
    return 0


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def compare(reg: Registry, args: argparse.Namespace) -> int:
    report = reg.compare(args.name, args.versions)
    if args.json:
        return emit(args, report, "")
    versions = report["versions"]
    print(f"{'':<28}" + "".join(f"{v:>14}" for v in versions))
    print(f"{'stage':<28}" + "".join(f"{report['stages'][v]:>14}" for v in versions))
    for metric, values in report["metrics"].items():
        print(f"{metric:<28}" + "".join(f"{fmt(values[v]):>14}" for v in versions))
    for param, values in report["params"].items():
        print(f"param {param:<22}" + "".join(f"{json.dumps(values[v]):>14}" for v in versions))
    return 0


def history(reg: Registry, args: argparse.Namespace) -> int:
    if args.trace:
        from lifecycle.retrain import trace

        chain = trace.trace(reg, args.name, args.trace)
        return emit(args, chain, trace.lines(chain))
    rows = reg.history(args.name)
    if args.json:
        return emit(args, rows, "")
    for row in rows:
        print(f"{row['at'][:19]}  {row['version']:<8} {row['from_stage']:>10} -> {row['to_stage']:<10} "
              f"{row['reason'] or ''}")
    return 0


def retrain(reg: Registry, args: argparse.Namespace) -> int:
    from lifecycle.retrain.record import DecisionLog

    log = DecisionLog(reg)
    if args.action == "reset":
        d = log.reset(args.name, "cli", args.reason)
        return emit(args, d.to_dict(), f"{args.name}: circuit breaker reset ({d.run_id}); failed candidates before "
                                       "it no longer count")
    rows = [d.to_dict() for d in log.decisions(args.name)]
    text = "\n".join(f"{r.get('alert_id', ''):<40} {r.get('action', ''):<8} {r.get('outcome', ''):<16} "
                     f"{r.get('outcome_reason') or r.get('reason', '')}" for r in rows)
    return emit(args, rows, text)


def promote(reg: Registry, args: argparse.Namespace) -> int:
    v = reg.promote(args.name, args.version, args.stage, args.reason)
    return emit(args, v.to_dict(), f"{v.name}:{v.version} is now in {v.stage}")


def rollback(reg: Registry, args: argparse.Namespace) -> int:
    restored, retired = reg.rollback(args.name, args.to, args.reason)
    return emit(args, {"restored": restored.to_dict(), "retired": retired.to_dict()},
                f"rolled back {args.name}: {restored.version} is Production again, {retired.version} archived")


def parser() -> OneLineParser:
    root = OneLineParser(prog="registry", description="Model registry on MLflow: stages as aliases, with history.")
    uri_help = "MLflow server/database URI or SQLite file (default: MLOPS_MLFLOW_URI, else embedded)"
    root.add_argument("--mlflow-uri", "--registry", dest="mlflow_uri", help=uri_help)
    root.add_argument("--json", action="store_true", help="machine-readable output")
    sub = root.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def verb(name: str, help_text: str) -> OneLineParser:
        """The common options are taken after the verb too (SUPPRESS: one given before it is kept)."""
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--mlflow-uri", "--registry", dest="mlflow_uri", default=argparse.SUPPRESS, help=uri_help)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return p

    r = verb("register", "enter a stored version (or an ONNX file) into the lifecycle")
    r.add_argument("--name", required=True)
    r.add_argument("--version", required=True)
    r.add_argument("--metrics")
    r.add_argument("--params")
    r.add_argument("--model-file", help="an ONNX model to store first (checked: loadable, input features [N, 5])")
    r.add_argument("--stage", default="none")
    p = verb("promote", "move a version to a stage (production archives the previous one)")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--reason", default="promoted")
    ls = verb("list", "versions with stage, metrics and aliases")
    ls.add_argument("--name")
    ls.add_argument("--stage")
    c = verb("compare", "metrics and differing params of versions")
    c.add_argument("--name", required=True)
    c.add_argument("--versions", nargs="+", required=True)
    rb = verb("rollback", "Production back to the previous one, or to --to")
    rb.add_argument("--name", required=True)
    rb.add_argument("--to", help="version to restore (default: the one Production before the current)")
    rb.add_argument("--reason", default="rollback")
    h = verb("history", "every stage change with time and reason")
    h.add_argument("--name", required=True)
    h.add_argument("--trace", metavar="ID", help="one retraining decision from its alert to its alias change: an "
                                                 "alert id, decision or training run id, candidate or rollout id")
    rollout_cli.add_verbs(sub, verb)
    rt = verb("retrain", "the retraining controller's record: decisions, and closing its circuit breaker")
    rt_actions = rt.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    for action_name, text in (("decisions", "every decision on an alert, newest first"),
                              ("reset", "close the circuit breaker: failed candidates before this no longer count")):
        a = rt_actions.add_parser(action_name, help=text)
        a.add_argument("--name", required=True)
        a.add_argument("--mlflow-uri", "--registry", dest="mlflow_uri", default=argparse.SUPPRESS, help=uri_help)
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        if action_name == "reset":
            a.add_argument("--reason", default="reset")
    return root


COMMANDS = {"register": register, "promote": promote, "list": show_list, "compare": compare, "rollback": rollback,
            "history": history, "rollout": rollout_cli.rollout, "experiment": rollout_cli.experiment,
            "retrain": retrain}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
        if args.command == "experiment" and args.action == "plan":  # arithmetic only: no backend
            return rollout_cli.plan_experiment(args)
        settings = Settings.load()
        create = args.command == "register" and args.content is not None
        with fail_fast():
            reg = Registry(open_backend(args.mlflow_uri, settings, create=create), settings.registry_lock_timeout_s)
            return COMMANDS[args.command](reg, args)
    except (RegistryError, UsageError, model_store.ModelStoreError, TrackingError) as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | BackendUnavailable) else 1
    except ValidationError as exc:
        print(f"registry: bad setting: {settings_error(exc)}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"registry: MLflow: {exc.message.strip().splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
