"""The streaming side of the drift report: the consumer group's live window, from its Redis checkpoints.

`mlops-drift report --window 3600 --out report.html` sums every partition's time slots of the last
``--window`` seconds (the same topic-wide window the consumer judges, over longer or shorter spans if
asked, up to what the checkpoints still hold), scores each column against the model version's reference
profile with the consumer's own statistics and rules, and renders the report `drift --html` renders.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime

from mlops import stattests
from mlops.profile import CategoricalProfile, NumericProfile, ReferenceProfile
from streaming import report as html_report
from streaming.rules import RuleSet
from streaming.state_store import StateStore
from streaming.window import Window, WindowSpec, merged_windows


class ReportError(ValueError):
    """Nothing to report (no checkpoints, no window, no profile): a one-line reason."""


def column_drift(column: str, profile_column: NumericProfile | CategoricalProfile, window: Window,
                 rules: RuleSet) -> html_report.ColumnDrift:
    scores = stattests.score_column(profile_column, window.counts, rules.tests.get(column))
    verdict = rules.judge(column, scores, "ok")
    reason = (f"{verdict.rule.metric} {verdict.value:.3f} > {verdict.rule.threshold}"
              if verdict.rule is not None and verdict.value is not None else "")
    if window.n < rules.min_samples:
        verdict_name, reason = "ok", f"only {window.n} events (alerts need {rules.min_samples})"
    else:
        verdict_name = verdict.severity
    if isinstance(profile_column, NumericProfile):
        bins = html_report.numeric_bin_labels(list(profile_column.edges))
        reference = [float(c) for c in profile_column.counts]
        kind = "numeric"
    else:
        bins = [*profile_column.categories, "(unseen)"]
        reference = [float(c) for c in profile_column.counts_with_unseen()]
        kind = "categorical"
    current = [float(c) for c in window.counts][:len(bins)]
    current += [0.0] * (len(bins) - len(current))
    return html_report.ColumnDrift(column, kind, bins, reference, current, scores, verdict_name, reason)


def build(store: StateStore, spec: WindowSpec, profiles, rules: RuleSet, model: str | None = None,
          now: float | None = None, skew: html_report.SkewSection | None = None) -> html_report.DriftReport:
    """The report of one model version: ``model`` (NAME or NAME:VERSION), or the version with most events; with
    the latest skew check when one is given."""
    checkpoints = store.load_all()
    if not checkpoints:
        raise ReportError(f"no checkpoints for consumer group {store.prefix.split(':')[2]!r}: is a consumer running?")
    windows = merged_windows([c.windows for c in checkpoints.values()], spec, now or time.time())
    by_version: dict[tuple[str, str], dict[str, Window]] = defaultdict(dict)
    for (name, version, column), window in windows.items():
        by_version[(name, version)][column] = window
    wanted = {k: v for k, v in by_version.items()
              if model is None or model in (k[0], f"{k[0]}:{k[1]}")}
    if not wanted:
        raise ReportError(f"no events of {model or 'any model'} in the last {spec.window_seconds:.0f}s")
    (name, version), columns = max(wanted.items(), key=lambda kv: max(w.n for w in kv[1].values()))
    profile: ReferenceProfile | None = profiles(name, version)
    if profile is None:
        raise ReportError(f"no reference profile for {name}:{version} in the model store")
    drifts = [column_drift(column, profile.columns[column], window, rules)
              for column, window in sorted(columns.items()) if column in profile.columns]
    first = min(w.first_slot for w in columns.values()) * spec.slot_seconds
    last = (max(w.last_slot for w in columns.values()) + 1) * spec.slot_seconds
    return html_report.DriftReport(
        title=f"Live drift: {name}:{version}, last {spec.window_seconds:.0f}s of the prediction log",
        columns=drifts, model_name=name, model_version=version,
        window_start=datetime.fromtimestamp(first, UTC), window_end=datetime.fromtimestamp(last, UTC),
        thresholds={f"{r.metric} ({r.severity})": r.threshold for r in rules.rules},
        source=f"consumer group {store.prefix.split(':')[2]!r}, {max(w.n for w in columns.values())} events",
        skew=skew,
    )
