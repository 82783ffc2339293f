"""The ``registry rollout …`` and ``registry experiment plan`` verbs (wired into ``registry``'s parser).

    registry rollout start   --name N --version V [--steps shadow,5,25,50,100] [--min-samples 500]
                             [--min-step-seconds 60] [--max-step-seconds 3600] [--alpha 0.05] [--reason R]
    registry rollout status  --name N
    registry rollout history --name N [--rollout ID]
    registry rollout pause|resume|abort --name N [--reason R]
    registry experiment plan --baseline-rate 0.02 --mde 0.1 [--relative] [--alpha 0.05] [--power 0.8]
                             [--share 0.5] [--daily-traffic N]
    registry experiment start    --name N --version V --samples N [--share 0.5] [--metric accuracy|caught]
                                 [--design sequential|fixed] [--alpha 0.05]
    registry experiment status   --name N
    registry experiment conclude --name N [--force]
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

from lifecycle.registry import Registry, RegistryError
from lifecycle.rollout import experiment as experiment_mod
from lifecycle.rollout import power
from lifecycle.rollout.state import Rollouts
from lifecycle.rollout.step_data import ArmReader, StepReader
from mlops.cli_args import OneLineParser, positive_int
from mlops.connections import kafka_config
from mlops.rollout import Policy, RolloutState, check_steps, parse_steps
from mlops.settings import Settings


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


def _model_action(actions: Any, name: str, help_text: str) -> OneLineParser:
    """An action on one registered model, taking the registry's common options after it too."""
    p = actions.add_parser(name, help=help_text)
    p.add_argument("--mlflow-uri", "--registry", dest="mlflow_uri", default=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p.add_argument("--name", required=True)
    return p


def add_verbs(sub: Any, verb: Callable[..., OneLineParser]) -> None:
    ro = verb("rollout", "progressive rollout of a candidate: shadow, then growing shares of traffic")
    actions = ro.add_subparsers(dest="action", required=True, parser_class=OneLineParser)

    def action(name: str, help_text: str) -> OneLineParser:
        return _model_action(actions, name, help_text)

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

    def ex_action(name: str, help_text: str) -> OneLineParser:
        return _model_action(ex_actions, name, help_text)

    es = ex_action("start", "split traffic between Production and --version until concluded")
    es.add_argument("--version", required=True)
    es.add_argument("--samples", type=positive_int, required=True, help="labelled predictions per arm (from plan)")
    es.add_argument("--share", type=finite, default=0.5, help="the candidate's share of customers")
    es.add_argument("--metric", choices=experiment_mod.METRICS, default="accuracy")
    es.add_argument("--design", choices=experiment_mod.DESIGNS, default="sequential")
    es.add_argument("--alpha", type=finite, default=0.05)
    es.add_argument("--reason", default="")
    ex_action("status", "the read-out: sequential and Bayesian, and the stopping rule's verdict")
    ec = ex_action("conclude", "promote the winner through the rollout, or keep Production")
    ec.add_argument("--force", action="store_true", help="conclude before the stopping rule says so (keeps "
                    "Production)")


def check(args: argparse.Namespace) -> None:
    """Argument checks before any backend is opened (ValueError: a usage error)."""
    if args.command == "rollout" and args.action == "start":
        args.steps = parse_steps(args.steps)
        args.policy = Policy(min_samples=args.min_samples, min_step_s=args.min_step_seconds,
                             max_step_s=args.max_step_seconds, alpha=args.alpha, max_psi=args.max_psi,
                             min_agreement=args.min_agreement, max_latency_ratio=args.max_latency_ratio,
                             max_quality_drop=args.max_quality_drop)
    if args.command == "experiment" and args.action == "plan":
        args.plan = power.plan(args.baseline_rate, args.mde, args.alpha, args.power, args.share, args.relative,
                               args.daily_traffic)
    if args.command == "experiment" and args.action == "start":
        if not 0 < args.share < 1:
            raise ValueError(f"--share must be in (0, 1), got {args.share:g}")
        check_steps((round(args.share * 100), 100))


def plan_experiment(args: argparse.Namespace) -> int:
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


def _experiment_state(reg: Registry, name: str) -> RolloutState:
    state = reg.rollout(name)
    if state is None or state.kind != "experiment" or not state.active:
        raise RegistryError(f"{name} has no experiment running")
    return state


def read_out(reg: Registry, state: RolloutState, settings: Settings) -> experiment_mod.Readout:
    """The experiment's arms read back from Kafka since its split began, and their read-out."""
    reader = StepReader(kafka_config(settings), state, settings.predictions_topic, settings.outcomes_topic,
                        int(datetime.fromisoformat(state.step_started_at).timestamp() * 1000),
                        threshold=settings.decision_threshold)
    try:
        reader.catch_up()
    finally:
        reader.close()
    metric = state.experiment["metric"]

    def counts(arm: ArmReader) -> experiment_mod.ArmCounts:
        return experiment_mod.ArmCounts(arm.labelled, arm.correct if metric == "accuracy" else arm.caught)

    return experiment_mod.readout(metric, state.experiment["design"], counts(reader.candidate),
                                  counts(reader.baseline), state.experiment["samples"], state.policy.alpha)


def start_experiment(reg: Registry, name: str, version: str, samples: int, share: float = 0.5,
                     metric: str = "accuracy", design: str = "sequential", alpha: float = 0.05, by: str = "cli",
                     reason: str = "") -> RolloutState:
    """A split held at ``share`` (no shadow step: both arms answer) until ``conclude``; up to 30 days."""
    return Rollouts(reg).start(name, version, (round(share * 100), 100),
                               Policy(min_samples=samples, alpha=alpha, max_step_s=30 * 86400.0), by,
                               reason or f"experiment on {metric}", kind="experiment",
                               experiment={"metric": metric, "design": design, "samples": samples})


def readout_lines(state: RolloutState, r: experiment_mod.Readout, indent: str = "  ") -> list[str]:
    """The two read-outs side by side and the stopping rule's verdict, as ``experiment status`` prints them."""
    return [f"{indent}candidate {r.candidate.rate:.4f} ({r.candidate.successes:,}/{r.candidate.labelled:,})   "
            f"baseline {r.baseline.rate:.4f} ({r.baseline.successes:,}/{r.baseline.labelled:,})",
            f"{indent}sequential: difference {r.estimate:+.4f}, {1 - state.policy.alpha:.0%} confidence sequence "
            f"[{r.lower:+.4f}, {r.upper:+.4f}], always-valid p {r.p_value:.3g}",
            f"{indent}Bayesian:   P(candidate better) {r.prob_candidate_better:.3f}, expected loss choosing it "
            f"{r.expected_loss_candidate:.5f}, choosing the baseline {r.expected_loss_baseline:.5f}",
            f"{indent}stopping rule: {r.verdict}"]


def conclude(reg: Registry, state: RolloutState, r: experiment_mod.Readout, force: bool, by: str
             ) -> tuple[RolloutState, str]:
    """The stopping rule's verdict applied: the winner continues through the rollout, else Production stays.
    No verdict yet is refused unless ``force`` (which keeps Production)."""
    rollouts = Rollouts(reg)
    if r.verdict == "candidate":
        new = rollouts.apply(state.model, state.id, state.step_index, "promote", by,
                             f"experiment concluded: candidate better on {r.metric} ({r.estimate:+.4f}, "
                             f"CS [{r.lower:+.4f}, {r.upper:+.4f}])")
        return new, (f"{state.candidate} won: rolling out from {state.step} % to 100 % (the controller takes it "
                     "from here)")
    if r.verdict == "continue" and not force:
        raise RegistryError(f"experiment {state.id} has not reached a verdict (sequential: no difference excluded "
                            f"yet; fixed: {r.planned:,} per arm planned); --force keeps Production")
    new = rollouts.apply(state.model, state.id, state.step_index, "rollback", by,
                         f"experiment concluded: {r.verdict} on {r.metric} ({r.estimate:+.4f}); Production kept")
    return new, f"{state.baseline} stays in Production ({r.verdict}); {state.candidate} archived"


def experiment(reg: Registry, args: argparse.Namespace) -> int:
    if args.action == "start":
        state = start_experiment(reg, args.name, args.version, args.samples, args.share, args.metric, args.design,
                                 args.alpha, actor(), args.reason)
        if args.json:
            print(json.dumps({**json.loads(state.to_tag()), "share": state.share}, indent=2))
        else:
            print(f"experiment {state.id}: {args.version} on {state.share:.0%} of customers against "
                  f"{state.baseline}, {args.metric}, {args.design}, {args.samples:,} labelled predictions per arm")
        return 0
    state = _experiment_state(reg, args.name)
    r = read_out(reg, state, Settings.load())
    if args.action == "status":
        if args.json:
            print(json.dumps({"experiment": state.id, **r.to_dict()}, indent=2))
            return 0
        print(f"experiment {state.id}: {state.candidate} vs {state.baseline} on {r.metric} ({r.design}, "
              f"{r.planned:,} per arm planned)")
        print("\n".join(readout_lines(state, r)))
        return 0
    new, text = conclude(reg, state, r, args.force, actor())
    if args.json:
        print(json.dumps({"readout": r.to_dict(), "state": json.loads(new.to_tag())}, indent=2))
    else:
        print(text)
    return 0
