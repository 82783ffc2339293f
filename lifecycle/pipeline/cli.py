"""`pipeline` (validate, as the reference tool's command line) and `pipeline run`.

    pipeline --pipeline pipeline.json --strict [--json]                 validate (`pipeline validate ...` too)
                                                                        exit 0 valid, 1 errors, 2 unreadable
    pipeline run --pipeline pipeline.yaml [--version V] [--data-dir D]  exit 0 registered, 1 a stage failed,
                                                                        2 bad arguments or an unusable backend
    pipeline run --pipeline pipeline.yaml --engine ray [--address ray://head:10001]
                                    the point-in-time join and the training on Ray (in this process without an
                                    address); the same as MLOPS_RAY_ADDRESS or the file's compute: section
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from lifecycle import model_store
from lifecycle.cli_backend import BackendUnavailable, fail_fast, open_backend
from lifecycle.pipeline import definition, runner
from lifecycle.pipeline.compute import Compute, ComputeError
from lifecycle.pipeline.stages import StageFailed
from lifecycle.pipeline.validator import validate
from lifecycle.ray_runtime import RayUnavailable
from lifecycle.registry import Registry, RegistryError
from lifecycle.tracking import TrackingError
from mlops.cli_args import OneLineParser, settings_error
from mlops.settings import Settings


def load_or_none(path: Path) -> definition.Pipeline | None:
    """The pipeline, or None after printing why the file cannot be read (the caller exits 2)."""
    try:
        return definition.load(path)
    except definition.DefinitionError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    pipeline = load_or_none(args.pipeline)
    if pipeline is None:
        return 2
    findings = validate(pipeline, strict=args.strict)
    errors = [f for f in findings if f.level == "error"]
    if args.json:
        print(json.dumps({"pipeline": str(args.pipeline), "valid": not errors, "strict": args.strict,
                          "errors": [f.to_dict() for f in errors],
                          "warnings": [f.to_dict() for f in findings if f.level == "warning"]}, indent=2))
    else:
        for f in findings:
            where = f" [{f.stage}]" if f.stage else ""
            print(f"{f.level.upper():<7} {f.code}{where}: {f.message}")
        print(f"{args.pipeline}: {'valid' if not errors else 'invalid'} "
              f"({len(errors)} errors, {len(findings) - len(errors)} warnings)")
    return 1 if errors else 0


def cmd_run(args: argparse.Namespace) -> int:
    pipeline = load_or_none(args.pipeline)
    if pipeline is None:
        return 2
    errors = [f for f in validate(pipeline) if f.level == "error"]
    if errors:
        print(f"pipeline: {args.pipeline} is invalid: {errors[0].code}: {errors[0].message} "
              f"(run `pipeline validate` for all findings)", file=sys.stderr)
        return 1
    try:
        settings = Settings.load()
        for check, value in ((model_store.check_name, args.name), (model_store.check_version, args.version)):
            if value is not None:
                check(value)
    except ValidationError as exc:
        print(f"pipeline: bad setting: {settings_error(exc)}", file=sys.stderr)
        return 2
    except model_store.ModelStoreError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    if args.mlflow_uri:
        settings = settings.model_copy(update={"mlflow_uri": args.mlflow_uri})
    try:
        compute = Compute.resolve(pipeline.raw.get("compute"), args.engine, args.address or settings.ray_address)
    except ComputeError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    try:
        with fail_fast():
            registry = Registry(open_backend(args.mlflow_uri, settings, create=True),
                                settings.registry_lock_timeout_s)
            summary = runner.run(pipeline, registry, args.version, args.data_dir, args.name, settings,
                                 compute=compute)
    except (BackendUnavailable, RayUnavailable) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    except (StageFailed, RegistryError, model_store.ModelStoreError) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    except (TrackingError, MlflowException) as exc:
        print(f"pipeline: MLflow at {settings.tracking_uri.split('?')[0]}: {getattr(exc, 'message', exc)}",
              file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


COMMANDS = ("validate", "run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in COMMANDS for a in argv[:1]) and not any(a in ("-h", "--help") for a in argv[:1]):
        argv = ["validate", *argv]  # the reference's command line: `pipeline --pipeline p.json --strict --json`
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    return cmd_validate(args) if args.command == "validate" else cmd_run(args)


def parser() -> OneLineParser:
    parser = OneLineParser(prog="pipeline", description="Declarative training pipeline: validate (the default) or run.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    v = sub.add_parser("validate", help="check a pipeline file (also the default: `pipeline --pipeline F`)")
    v.add_argument("--pipeline", required=True, type=Path)
    v.add_argument("--strict", action="store_true", help="warnings count as errors")
    v.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run it as one MLflow run; registers the gated candidate")
    r.add_argument("--pipeline", required=True, type=Path)
    r.add_argument("--version", help="version to register (default: next vN)")
    r.add_argument("--name", help="model name (default: the pipeline's model_name)")
    r.add_argument("--data-dir", type=Path, help="for source: parquet/feast, the data folder")
    r.add_argument("--engine", choices=("auto", "local", "ray"),
                   help="where the join and the training run (default: the file's compute.engine, else auto: Ray "
                        "when there is an address)")
    r.add_argument("--address", help="a Ray cluster: ray://host:10001, or auto inside one (default: "
                                     "MLOPS_RAY_ADDRESS, else the file's compute.address; none: Ray in this process)")
    r.add_argument("--mlflow-uri", help="MLflow tracking/registry URI (default: MLOPS_MLFLOW_URI, else embedded)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
