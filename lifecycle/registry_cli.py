"""`registry`: register, promote, list, compare, roll back and audit model versions.

    registry register --name N --version V [--metrics '{..}'] [--params '{..}'] [--model-file m.onnx] [--stage S]
    registry promote  --name N --version V --stage production|staging|archived
    registry list     [--name N] [--stage production] [--json]
    registry compare  --name N --versions V1 V2 [--json]
    registry rollback --name N
    registry history  --name N [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lifecycle import model_store
from lifecycle.registry import Registry, RegistryError
from mlops.cli_args import OneLineParser
from mlops.schema import MODEL_FEATURES
from mlops.settings import Settings


class UsageError(ValueError):
    pass


def json_arg(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def register(reg: Registry, args: argparse.Namespace) -> int:
    metrics, params = json_arg(args.metrics, "--metrics"), json_arg(args.params, "--params")
    if args.model_file:
        path = Path(args.model_file)
        if not path.is_file():
            raise UsageError(f"--model-file {path} does not exist")
        meta = {"name": args.name, "version": args.version, "metrics": metrics, "params": params,
                "features": list(MODEL_FEATURES)}
        model_store.save(args.name, args.version, path.read_bytes(), meta)
    elif not model_store.exists(args.name, args.version):
        raise UsageError(f"no artifact for {args.name}:{args.version} in the model store: train it first "
                         "(mlops-train / pipeline run) or pass --model-file")
    stored = model_store.load(args.name, args.version).metadata
    version = reg.register(args.name, args.version, metrics or stored.get("metrics", {}),
                           params or stored.get("params", {}), stored.get("training_data_hash"),
                           stored.get("git_commit"), stage=args.stage)
    print(f"registered {version.name}:{version.version} in {version.stage}")
    return 0


def show_list(reg: Registry, args: argparse.Namespace) -> int:
    versions = reg.list(args.name, args.stage)
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    print(f"{'name':<20} {'version':<10} {'stage':<11} {'auc':>7} {'accuracy':>9}  created")
    for v in versions:
        auc, acc = v.metrics.get("auc"), v.metrics.get("accuracy")
        print(f"{v.name:<20} {v.version:<10} {v.stage:<11} {fmt(auc):>7} {fmt(acc):>9}  {v.created_at[:19]}")
    return 0


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def compare(reg: Registry, args: argparse.Namespace) -> int:
    report = reg.compare(args.name, args.versions)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    versions = report["versions"]
    print(f"{'':<28}" + "".join(f"{v:>14}" for v in versions))
    print(f"{'stage':<28}" + "".join(f"{report['stages'][v]:>14}" for v in versions))
    for metric, values in report["metrics"].items():
        print(f"{metric:<28}" + "".join(f"{fmt(values[v]):>14}" for v in versions))
    for param, values in report["params"].items():
        print(f"param {param:<22}" + "".join(f"{json.dumps(values[v]):>14}" for v in versions))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="registry", description="Model registry with stages.")
    parser.add_argument("--registry", type=Path, help="SQLite file (default: MLOPS_REGISTRY_PATH)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    r = sub.add_parser("register")
    r.add_argument("--name", required=True)
    r.add_argument("--version", required=True)
    r.add_argument("--metrics")
    r.add_argument("--params")
    r.add_argument("--model-file")
    r.add_argument("--stage", default="none")
    p = sub.add_parser("promote")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--stage", required=True)
    ls = sub.add_parser("list")
    ls.add_argument("--name")
    ls.add_argument("--stage")
    ls.add_argument("--json", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("--name", required=True)
    c.add_argument("--versions", nargs="+", required=True)
    c.add_argument("--json", action="store_true")
    rb = sub.add_parser("rollback")
    rb.add_argument("--name", required=True)
    h = sub.add_parser("history")
    h.add_argument("--name", required=True)
    h.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reg = Registry(args.registry or Settings.load().registry_path)
    try:
        if args.command == "register":
            return register(reg, args)
        if args.command == "promote":
            v = reg.promote(args.name, args.version, args.stage)
            print(f"{v.name}:{v.version} is now in {v.stage}")
        elif args.command == "list":
            return show_list(reg, args)
        elif args.command == "compare":
            if len(args.versions) < 2:
                raise UsageError("--versions needs at least two versions")
            return compare(reg, args)
        elif args.command == "rollback":
            restored, retired = reg.rollback(args.name)
            print(f"rolled back {args.name}: {restored.version} is Production again, {retired.version} archived")
        else:
            rows = reg.history(args.name)
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                print(f"{row['at'][:19]}  {row['version']:<8} {row['from_stage']:>10} -> {row['to_stage']:<10} "
                      f"{row['reason'] or ''}")
    except (RegistryError, UsageError, model_store.ModelStoreError) as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
