"""The ``registry rollout …`` and ``registry experiment plan`` verbs (wired into ``registry``'s parser).

    registry rollout start   --name N --version V [--steps shadow,5,25,50,100] [--min-samples 500]
                             [--min-step-seconds 60] [--max-step-seconds 3600] [--alpha 0.05] [--reason R]
    registry rollout status  --name N
    registry rollout history --name N [--rollout ID]
    registry rollout pause|resume|abort --name N [--reason R]
    registry experiment plan --baseline-rate 0.02 --mde 0.1 [--relative] [--alpha 0.05] [--power 0.8]
                             [--share 0.5] [--daily-traffic N]
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import socket
from collections.abc import Callable
from typing import Any

from lifecycle.registry import Registry
from lifecycle.rollout import power
from lifecycle.rollout.state import Rollouts
from mlops.cli_args import OneLineParser, positive_int
from mlops.rollout import Policy, RolloutState, parse_steps


def actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return "cli"


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_verbs(sub: Any, verb: Callable[..., OneLineParser]) -> None:
    ro = verb("rollout", "progressive rollout of a candidate: shadow, then growing shares of traffic")
    actions = ro.add_subparsers(dest="action", required=True, parser_class=OneLineParser)

    def action(name: str, help_text: str) -> OneLineParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--mlflow-uri", "--registry", dest="mlflow_uri", default=argparse.SUPPRESS)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        p.add_argument("--name", required=True)
        return p

    start = action("start", "start rolling out --version against Production")
    start.add_argument("--version", required=True)
    start.add_argument("--steps", default="shadow,5,25,50,100", help="candidate's share per step, %% (0: shadow)")
    start.add_argument("--min-samples", type=positive_int, default=Policy.min_samples)
    start.add_argument("--min-step-seconds", type=finite, default=Policy.min_step_s)
    start.add_argument("--max-step-seconds", type=finite, default=Policy.max_step_s)
    start.add_argument("--alpha", type=finite, default=Policy.alpha, help="false-rollback rate of the whole rollout")
    start.add_argument("--max-psi", type=finite, default=Policy.max_psi)
    start.add_argument("--min-agreement", type=finite, default=Policy.min_agreement,
                       help="shadow: share of rows on which the candidate decides as Production")
    start.add_argument("--max-latency-ratio", type=finite, default=Policy.max_latency_ratio)
    start.add_argument("--max-quality-drop", type=finite, default=Policy.max_quality_drop)
    start.add_argument("--reason", default="")
    action("status", "the rollout's step, share and last decision")
    hist = action("history", "every decision of the model's rollouts, with the statistics behind it")
    hist.add_argument("--rollout", help="only this rollout's decisions")
    for name, text in (("pause", "hold the current step (traffic split unchanged)"),
                       ("resume", "let the controller decide again (the step's clock restarts)"),
                       ("abort", "end the rollout: the candidate's share goes to 0 and it returns to None")):
        action(name, text).add_argument("--reason", default=name + "d" if name != "abort" else "aborted")

    ex = verb("experiment", "A/B experiments: plan the sample before starting")
    ex_actions = ex.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    plan = ex_actions.add_parser("plan", help="power analysis: samples per arm and days at your traffic")
    plan.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    plan.add_argument("--baseline-rate", type=finite, required=True, help="today's rate, e.g. 0.02")
    plan.add_argument("--mde", type=finite, required=True, help="smallest change worth finding (absolute)")
    plan.add_argument("--relative", action="store_true", help="--mde is relative (0.1 = 10 %%)")
    plan.add_argument("--alpha", type=finite, default=0.05)
    plan.add_argument("--power", type=finite, default=0.8)
    plan.add_argument("--share", type=finite, default=0.5, help="the candidate's share of traffic")
    plan.add_argument("--daily-traffic", type=positive_int, help="predictions per day, for the duration")


def check(args: argparse.Namespace) -> None:
    """Argument checks before any backend is opened (ValueError: a usage error)."""
    if args.command == "rollout" and args.action == "start":
        args.steps = parse_steps(args.steps)
        args.policy = Policy(min_samples=args.min_samples, min_step_s=args.min_step_seconds,
                             max_step_s=args.max_step_seconds, alpha=args.alpha, max_psi=args.max_psi,
                             min_agreement=args.min_agreement, max_latency_ratio=args.max_latency_ratio,
                             max_quality_drop=args.max_quality_drop)
    if args.command == "experiment":
        args.plan = power.plan(args.baseline_rate, args.mde, args.alpha, args.power, args.share, args.relative,
                               args.daily_traffic)


def experiment(args: argparse.Namespace) -> int:
    p = args.plan
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    days = (lambda d: f", {d:.1f} days at {p.daily_traffic:,}/day") if p.daily_traffic else (lambda d: "")
    print(f"baseline {p.baseline_rate:g} -> {p.expected_rate:g} (alpha {p.alpha:g}, power {p.power:g}, "
          f"candidate share {p.share:g})")
    print(f"  fixed horizon (read once): {p.fixed_per_arm:,} candidate + {p.fixed_baseline:,} baseline predictions"
          f"{days(p.fixed_days)}")
    print(f"  sequential (read any time): {p.sequential_per_arm:,} + {p.sequential_baseline:,}"
          f"{days(p.sequential_days)}")
    return 0


def describe(state: RolloutState) -> str:
    step = "shadow" if state.step == 0 else f"{state.step} %"
    return (f"rollout {state.id} of {state.model}: {state.candidate} against {state.baseline}, {state.status}, "
            f"step {state.step_index + 1} of {len(state.steps)} ({step}, since {state.step_started_at[:19]}), "
            f"last by {state.actor}: {state.reason}")


def rollout(reg: Registry, args: argparse.Namespace) -> int:
    rollouts = Rollouts(reg)
    if args.action == "start":
        state = rollouts.start(args.name, args.version, args.steps, args.policy, actor(), args.reason)
    elif args.action in ("pause", "resume", "abort"):
        state = getattr(rollouts, args.action)(args.name, actor(), args.reason)
    elif args.action == "history":
        rows = reg.rollout_decisions(args.name, args.rollout)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            step = "shadow" if r["step"] == 0 else f"{r['step']}%"
            print(f"{r['at'][:19]}  {r['rollout_id']}  {r['candidate']:<8} {step:>6}  {r['action']:<8} "
                  f"{r['status']:<11} {r['actor']:<24} {r['reason']}")
        return 0
    else:
        found = rollouts.status(args.name)
        if found is None:
            print(json.dumps(None) if args.json else f"{args.name} has never had a rollout")
            return 0
        state = found
    if args.json:
        print(json.dumps({**json.loads(state.to_tag()), "share": state.share, "shadow": state.shadow}, indent=2))
    else:
        print(describe(state))
    return 0
