"""`drift`: batch drift between two CSV files, per column.

    drift --reference train.csv --current prod.csv [--columns a,b | --include a,b] [--threshold 0.2]
          [--ks-threshold 0.15] [--alpha 0.05] [--json] [--html report.html [--model NAME:VERSION]]

The reference file is profiled exactly as training profiles a model's data (mlops/profile.py: 40 quantile bins
per numeric column, the categories plus an "unseen" bin per categorical one), the current file is binned into
those bins, and every score comes from the one scoring function the streaming consumer uses (mlops/stattests:
PSI over ~10 mass-balanced groups of the bins, histogram KS, Wasserstein, Jensen-Shannon; chi-square, Cramér's
V, Jensen-Shannon), so the same data gets the same numbers here and in the stream (a test holds them equal).
Numeric columns also get scipy's exact two-sample KS (statistic, p-value), which only raw values allow. A column
drifted when PSI > --threshold, or (numeric) exact KS > --ks-threshold with p < --alpha, or (categorical) chi-
square p < --alpha; `--json` lists every score under `scores`. With two numeric columns or more, the columns
together too (mlops/profile.py's PCA reconstruction error, as the stream scores it; `multivariate` in JSON, a
line of its own in the table, a section in the HTML report): it catches a broken correlation. A column holding a
single category in both files has chi-square statistic 0 and p-value 1.0 (nothing can differ); JSON output never
holds NaN or Infinity (a value that is not a finite number would be null).
Identifier and timestamp columns (streaming/column_kinds.py: by name, unique-per-row strings, ISO dates) are
skipped by default, and the output lists them with the reason; --include names some back in, --columns
compares exactly the columns it names (nothing skipped); the two exclude each other.
--html also writes a self-contained HTML report (streaming/report.py): per column the reference and current
histograms over the bins the scores use, verdicts critical (PSI over --threshold), warning (only the KS or
chi-square test says drifted) or ok, sorted by severity; the time range is the current file's
`timestamp`/`event_timestamp` column when it has one.
Exit code: 0 nothing drifted, 1 something drifted, 2 bad usage or input (one-line reason on stderr): missing or
unreadable files, --columns with --include, unknown --columns/--include, nothing left to compare, a threshold
that is not a finite number in range (--threshold > 0, 0 < --ks-threshold < 1, 0 < --alpha < 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlops import stats, stattests
from mlops.cli_args import OneLineParser
from mlops.profile import MULTIVARIATE, PREDICTION, CategoricalProfile, ColumnProfile, Multivariate, NumericProfile
from streaming import report as html_report
from streaming.column_kinds import skip_reason

TIME_COLUMNS = ("timestamp", "event_timestamp")


class BadInput(ValueError):
    """The files or columns cannot be compared."""


@dataclass
class ColumnResult:
    column: str
    type: str
    test: str
    statistic: float
    p_value: float
    psi: float
    drifted: bool
    n_reference: int
    n_current: int
    scores: dict[str, float]


def read_csv(path: Path, role: str) -> pd.DataFrame:
    if not path.is_file():
        raise BadInput(f"{role} file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadInput(f"{role} file {path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise BadInput(f"{role} file {path} has no rows")
    return frame


def numeric_values(series: pd.Series, column: str, role: str) -> np.ndarray:
    converted = pd.to_numeric(series, errors="coerce")
    bad = series[converted.isna() & series.notna()]
    if len(bad):
        raise BadInput(f"column {column!r}: non-numeric value {bad.iloc[0]!r} in {role} where numbers are expected")
    values = converted.dropna().to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise BadInput(f"column {column!r}: infinite values in {role}")
    if len(values) == 0:
        raise BadInput(f"column {column!r}: no values in {role}")
    return values


def profile_of(reference: np.ndarray | pd.Series) -> ColumnProfile:
    """The reference column profiled as training profiles it (the bins both drift paths score on)."""
    if isinstance(reference, np.ndarray):
        return NumericProfile.build(reference)
    return CategoricalProfile.build(reference.to_numpy())


def current_counts(profile: ColumnProfile, current: np.ndarray | pd.Series) -> np.ndarray:
    """The current values counted into the profile's bins, as the stream's absorber counts events."""
    if isinstance(profile, NumericProfile):
        return stats.histogram(np.asarray(profile.edges), np.asarray(current, dtype=np.float64))
    return np.bincount([profile.index(v) for v in current], minlength=profile.n_bins)


def compare_numeric(column: str, ref: np.ndarray, cur: np.ndarray, args: argparse.Namespace) -> ColumnResult:
    profile = profile_of(ref)
    scores = stattests.score_column(profile, current_counts(profile, cur))
    ks, p = stats.ks_exact(ref, cur)
    scores.update(ks_exact=ks, ks_pvalue=p)
    drifted = scores["psi"] > args.threshold or (ks > args.ks_threshold and p < args.alpha)
    return ColumnResult(column, "numeric", "ks", ks, p, scores["psi"], drifted, len(ref), len(cur), scores)


def compare_categorical(column: str, ref: pd.Series, cur: pd.Series, args: argparse.Namespace) -> ColumnResult:
    ref, cur = ref.dropna().astype(str), cur.dropna().astype(str)
    if ref.empty or cur.empty:
        raise BadInput(f"column {column!r}: no values in {'reference' if ref.empty else 'current'}")
    profile = profile_of(ref)
    scores = stattests.score_column(profile, current_counts(profile, cur))
    drifted = scores["psi"] > args.threshold or scores["chi2_pvalue"] < args.alpha
    return ColumnResult(column, "categorical", "chi2", scores["chi2"], scores["chi2_pvalue"], scores["psi"], drifted,
                        len(ref), len(cur), scores)


@dataclass
class Skipped:
    column: str
    reason: str


def select_columns(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str] | None,
                   include: list[str]) -> tuple[list[str], list[Skipped]]:
    """The columns to compare and those skipped as identifiers or timestamps (``--columns``: exactly those)."""
    shared = [c for c in reference.columns if c in current.columns]
    missing = [c for c in (columns or []) + include if c not in shared]
    if missing:
        raise BadInput(f"columns not in both files: {', '.join(missing)}")
    if not shared:
        raise BadInput("the two files share no columns")
    if columns:
        return columns, []
    chosen, skipped = [], []
    for column in shared:
        reason = None if column in include else skip_reason(column, reference[column])
        if reason is None:
            chosen.append(column)
        else:
            skipped.append(Skipped(column, reason))
    if not chosen:
        raise BadInput(f"every shared column looks like an identifier or a timestamp ({describe(skipped)}); "
                       "name the ones to compare with --include or --columns")
    return chosen, skipped


def describe(skipped: list[Skipped]) -> str:
    return ", ".join(f"{s.column} ({s.reason})" for s in skipped)


def compare(reference: pd.DataFrame, current: pd.DataFrame, shared: list[str],
            args: argparse.Namespace) -> list[ColumnResult]:
    results = []
    for column in shared:
        if pd.api.types.is_numeric_dtype(reference[column]):
            ref = numeric_values(reference[column], column, "reference")
            results.append(compare_numeric(column, ref, numeric_values(current[column], column, "current"), args))
        else:
            results.append(compare_categorical(column, reference[column], current[column], args))
    return results


def compare_multivariate(reference: pd.DataFrame, current: pd.DataFrame, shared: list[str],
                         args: argparse.Namespace) -> ColumnResult | None:
    """The columns together: their PCA reconstruction error scored like a numeric column (None: fewer than two
    numeric columns)."""
    errors = multivariate_errors(reference, current, shared)
    return None if errors is None else compare_numeric(MULTIVARIATE, *errors, args)


def multivariate_errors(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str]
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """Each complete row's PCA reconstruction error over the compared numeric columns (the model's score,
    ``prediction``, left out as the stream leaves it out), the PCA fitted on the reference as training fits it
    (mlops/profile.py); None with fewer than two such columns."""
    numeric = [c for c in columns if c != PREDICTION and pd.api.types.is_numeric_dtype(reference[c])]
    if len(numeric) < 2:
        return None
    ref = reference[numeric].apply(pd.to_numeric, errors="coerce").dropna().to_numpy(dtype=np.float64)
    cur = current[numeric].apply(pd.to_numeric, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if not len(ref) or not len(cur):
        return None
    model = Multivariate.fit({c: ref[:, i] for i, c in enumerate(numeric)})
    return model.errors(ref), model.errors(cur)


def verdict(result: ColumnResult, args: argparse.Namespace) -> tuple[html_report.Verdict, str]:
    if result.psi > args.threshold:
        return "critical", f"PSI {result.psi:.3f} > {args.threshold:g}"
    if result.drifted:
        test = "KS" if result.test == "ks" else "chi-square"
        extra = f"KS {result.statistic:.3f} > {args.ks_threshold:g}, " if result.test == "ks" else ""
        return "warning", f"{extra}{test} p {result.p_value:.2g} < {args.alpha:g}"
    if result.test == "ks":
        return "ok", f"PSI {result.psi:.3f} ≤ {args.threshold:g}, KS {result.statistic:.3f} (p {result.p_value:.2g})"
    return "ok", f"PSI {result.psi:.3f} ≤ {args.threshold:g}, chi-square p {result.p_value:.2g} ≥ {args.alpha:g}"


def report_column(result: ColumnResult, reference: pd.DataFrame, current: pd.DataFrame,
                  args: argparse.Namespace, columns: list[str]) -> html_report.ColumnDrift:
    """The histogram the scores were computed on: the profile's bins (reference quantiles, or the categories)."""
    name = result.column
    if name == MULTIVARIATE and name not in reference.columns:
        errors = multivariate_errors(reference, current, [c for c in columns if c != MULTIVARIATE])
        assert errors is not None
        profile = profile_of(errors[0])
        counts = current_counts(profile, errors[1])
        bins = html_report.numeric_bin_labels(list(profile.edges))
        ref_counts = profile.counts
    elif result.type == "numeric":
        ref = numeric_values(reference[name], name, "reference")
        profile = profile_of(ref)
        counts = current_counts(profile, numeric_values(current[name], name, "current"))
        bins = html_report.numeric_bin_labels(list(profile.edges))
        ref_counts = profile.counts
    else:
        profile = profile_of(reference[name].dropna().astype(str))
        counts = current_counts(profile, current[name].dropna().astype(str))
        bins, ref_counts = [*profile.categories, "(unseen)"], profile.counts_with_unseen()
    level, reason = verdict(result, args)
    return html_report.ColumnDrift(name, result.type, bins, [float(x) for x in ref_counts],
                                   [float(x) for x in counts], result.scores, level, reason)


def time_range(frame: pd.DataFrame) -> tuple[str | None, str | None]:
    for column in TIME_COLUMNS:
        if column in frame.columns:
            times = pd.to_datetime(frame[column], errors="coerce", utc=True).dropna()
            if len(times):
                return times.min().isoformat(), times.max().isoformat()
    return None, None


def build_report(results: list[ColumnResult], reference: pd.DataFrame, current: pd.DataFrame,
                 args: argparse.Namespace, skipped: list[Skipped] | None = None) -> html_report.DriftReport:
    model_name, _, model_version = (args.model or "").partition(":")
    start, end = time_range(current)
    return html_report.DriftReport(
        title=f"Drift report: {args.current.name} against {args.reference.name}",
        columns=[report_column(r, reference, current, args, [x.column for x in results]) for r in results],
        model_name=model_name or None, model_version=model_version or None, window_start=start, window_end=end,
        thresholds={"psi": args.threshold, "ks": args.ks_threshold, "ks_pvalue": args.alpha},
        source=f"batch: reference {args.reference} ({len(reference):,} rows), current {args.current} "
               f"({len(current):,} rows)" + (f"; not compared: {describe(skipped)}" if skipped else ""),
    )


def render_table(results: list[ColumnResult], skipped: list[Skipped], together: ColumnResult | None = None) -> str:
    header = f"{'column':<24} {'type':<12} {'test':<5} {'statistic':>10} {'p_value':>10} {'psi':>8}  drifted"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.column:<24} {r.type:<12} {r.test:<5} {r.statistic:>10.4f} {r.p_value:>10.4g} "
                     f"{r.psi:>8.4f}  {'yes' if r.drifted else 'no'}")
    drifted = [r.column for r in results if r.drifted]
    lines.append(f"\n{len(drifted)} of {len(results)} columns drifted" + (f": {', '.join(drifted)}" if drifted else ""))
    if together is not None:
        verdict_text = "drifted" if together.drifted else "no drift"
        lines.append(f"the numeric columns together (PCA reconstruction error): PSI {together.psi:.4f}, KS "
                     f"{together.statistic:.4f} (p {together.p_value:.4g}): {verdict_text}")
    if skipped:
        lines.append(f"skipped, not compared (--include NAME,... compares them): {describe(skipped)}")
    return "\n".join(lines)


def finite_or_none(value):
    """JSON has no NaN or Infinity: such a value is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def check_thresholds(args: argparse.Namespace) -> None:
    """NaN compares false with everything, so ``--threshold nan`` would silently switch detection off."""
    limits = {"--threshold": (args.threshold, math.inf, "> 0"), "--ks-threshold": (args.ks_threshold, 1, "in (0, 1)"),
              "--alpha": (args.alpha, 1, "in (0, 1)")}
    for flag, (value, upper, wanted) in limits.items():
        if not (math.isfinite(value) and 0 < value < upper):
            raise BadInput(f"{flag} must be a finite number {wanted}, got {value:g}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="drift", description="Drift between a reference and a current CSV.")
    parser.add_argument("--reference", required=True, type=Path)
    parser.add_argument("--current", required=True, type=Path)
    which = parser.add_mutually_exclusive_group()  # --columns names every column, so --include has no say
    which.add_argument("--columns", help="compare exactly these, comma-separated (default: all shared columns "
                       "but identifiers and timestamps)")
    which.add_argument("--include", default="", help="comma-separated identifier/timestamp columns to compare "
                       "anyway (skipped by default)")
    parser.add_argument("--threshold", type=float, default=0.2, help="PSI above this is drift (default 0.2)")
    parser.add_argument("--ks-threshold", type=float, default=0.15,
                        help="KS statistic threshold, in (0, 1) (default 0.15)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of KS/chi-square, in (0, 1)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--html", type=Path, help="also write a self-contained HTML report to this file")
    parser.add_argument("--model", help="NAME[:VERSION] of the model the current data went to (for the report)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return 2 if exc.code else 0
    try:
        check_thresholds(args)
        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        include = [c.strip() for c in args.include.split(",") if c.strip()]
        reference, current = read_csv(args.reference, "reference"), read_csv(args.current, "current")
        chosen, skipped = select_columns(reference, current, columns, include)
        results = compare(reference, current, chosen, args)
        together = compare_multivariate(reference, current, chosen, args)
        if args.html:
            html_report.write_html(build_report([*results, *([together] if together else [])], reference, current,
                                                args, skipped), args.html)
    except BadInput as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"drift: cannot write the HTML report {args.html}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    drifted = any(r.drifted for r in results) or bool(together and together.drifted)
    if args.json:
        body = {"drifted": drifted, "columns": [asdict(r) for r in results],
                "multivariate": asdict(together) if together else None,
                "skipped": [asdict(s) for s in skipped],
                "thresholds": {"psi": args.threshold, "ks": args.ks_threshold, "alpha": args.alpha}}
        print(json.dumps(finite_or_none(body), indent=2, allow_nan=False))
    else:
        print(render_table(results, skipped, together))
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
