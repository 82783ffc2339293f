"""`drift`: batch drift between two CSV files, per column.

    drift --reference train.csv --current prod.csv [--columns a,b] [--threshold 0.2]
          [--ks-threshold 0.15] [--alpha 0.05] [--json] [--html report.html [--model NAME:VERSION]]

Numeric columns: scipy's exact two-sample KS (statistic, p-value) and PSI over 10 reference-quantile bins.
Categorical columns (non-numeric in the reference): chi-square of the current counts against the reference
frequencies, and PSI over the categories. A column drifted when PSI > --threshold, or (numeric) KS >
--ks-threshold with p < --alpha, or (categorical) chi-square p < --alpha.
--html also writes a self-contained HTML report (streaming/report.py): per column the reference and current
histograms over the bins the scores use, verdicts critical (PSI over --threshold), warning (only the KS or
chi-square test says drifted) or ok, sorted by severity; the time range is the current file's
`timestamp`/`event_timestamp` column when it has one.
Exit code: 0 nothing drifted, 1 something drifted, 2 bad input (one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlops.cli_args import OneLineParser
from streaming import report as html_report
from streaming import stats

PSI_BINS = 10
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


def compare_numeric(column: str, ref: np.ndarray, cur: np.ndarray, args: argparse.Namespace) -> ColumnResult:
    ks, p = stats.ks_exact(ref, cur)
    edges = stats.quantile_edges(ref, PSI_BINS)
    psi = stats.psi(stats.histogram(edges, ref), stats.histogram(edges, cur))
    drifted = psi > args.threshold or (ks > args.ks_threshold and p < args.alpha)
    return ColumnResult(column, "numeric", "ks", ks, p, psi, drifted, len(ref), len(cur))


def compare_categorical(column: str, ref: pd.Series, cur: pd.Series, args: argparse.Namespace) -> ColumnResult:
    ref, cur = ref.dropna().astype(str), cur.dropna().astype(str)
    if ref.empty or cur.empty:
        raise BadInput(f"column {column!r}: no values in {'reference' if ref.empty else 'current'}")
    categories = sorted(set(ref) | set(cur))
    ref_counts = ref.value_counts().reindex(categories, fill_value=0).to_numpy()
    cur_counts = cur.value_counts().reindex(categories, fill_value=0).to_numpy()
    chi2, p = stats.chi_square(ref_counts, cur_counts)
    psi = stats.psi(ref_counts, cur_counts)
    drifted = psi > args.threshold or p < args.alpha
    return ColumnResult(column, "categorical", "chi2", chi2, p, psi, drifted, len(ref), len(cur))


def compare(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str] | None,
            args: argparse.Namespace) -> list[ColumnResult]:
    shared = [c for c in reference.columns if c in current.columns]
    if columns:
        missing = [c for c in columns if c not in shared]
        if missing:
            raise BadInput(f"columns not in both files: {', '.join(missing)}")
        shared = columns
    if not shared:
        raise BadInput("the two files share no columns")
    results = []
    for column in shared:
        if pd.api.types.is_numeric_dtype(reference[column]):
            ref = numeric_values(reference[column], column, "reference")
            results.append(compare_numeric(column, ref, numeric_values(current[column], column, "current"), args))
        else:
            results.append(compare_categorical(column, reference[column], current[column], args))
    return results


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
                  args: argparse.Namespace) -> html_report.ColumnDrift:
    """The histogram the scores were computed on: reference-quantile bins, or the categories."""
    name = result.column
    if result.type == "numeric":
        ref = numeric_values(reference[name], name, "reference")
        cur = numeric_values(current[name], name, "current")
        edges = stats.quantile_edges(ref, PSI_BINS)
        bins, ref_counts, cur_counts = html_report.numeric_bin_labels(edges), stats.histogram(edges, ref), \
            stats.histogram(edges, cur)
        scores = {"psi": result.psi, "ks": result.statistic, "ks_pvalue": result.p_value}
    else:
        ref_s, cur_s = reference[name].dropna().astype(str), current[name].dropna().astype(str)
        bins = sorted(set(ref_s) | set(cur_s))
        ref_counts = ref_s.value_counts().reindex(bins, fill_value=0).to_numpy()
        cur_counts = cur_s.value_counts().reindex(bins, fill_value=0).to_numpy()
        scores = {"psi": result.psi, "chi2": result.statistic, "chi2_pvalue": result.p_value}
    level, reason = verdict(result, args)
    return html_report.ColumnDrift(name, result.type, bins, [float(x) for x in ref_counts],
                                   [float(x) for x in cur_counts], scores, level, reason)


def time_range(frame: pd.DataFrame) -> tuple[str | None, str | None]:
    for column in TIME_COLUMNS:
        if column in frame.columns:
            times = pd.to_datetime(frame[column], errors="coerce", utc=True).dropna()
            if len(times):
                return times.min().isoformat(), times.max().isoformat()
    return None, None


def build_report(results: list[ColumnResult], reference: pd.DataFrame, current: pd.DataFrame,
                 args: argparse.Namespace) -> html_report.DriftReport:
    model_name, _, model_version = (args.model or "").partition(":")
    start, end = time_range(current)
    return html_report.DriftReport(
        title=f"Drift report: {args.current.name} against {args.reference.name}",
        columns=[report_column(r, reference, current, args) for r in results],
        model_name=model_name or None, model_version=model_version or None, window_start=start, window_end=end,
        thresholds={"psi": args.threshold, "ks": args.ks_threshold, "ks_pvalue": args.alpha},
        source=f"batch: reference {args.reference} ({len(reference):,} rows), current {args.current} "
               f"({len(current):,} rows)",
    )


def render_table(results: list[ColumnResult]) -> str:
    header = f"{'column':<24} {'type':<12} {'test':<5} {'statistic':>10} {'p_value':>10} {'psi':>8}  drifted"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.column:<24} {r.type:<12} {r.test:<5} {r.statistic:>10.4f} {r.p_value:>10.4g} "
                     f"{r.psi:>8.4f}  {'yes' if r.drifted else 'no'}")
    drifted = [r.column for r in results if r.drifted]
    lines.append(f"\n{len(drifted)} of {len(results)} columns drifted" + (f": {', '.join(drifted)}" if drifted else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="drift", description="Drift between a reference and a current CSV.")
    parser.add_argument("--reference", required=True, type=Path)
    parser.add_argument("--current", required=True, type=Path)
    parser.add_argument("--columns", help="comma-separated columns (default: all shared columns)")
    parser.add_argument("--threshold", type=float, default=0.2, help="PSI above this is drift (default 0.2)")
    parser.add_argument("--ks-threshold", type=float, default=0.15, help="KS statistic threshold (default 0.15)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of KS/chi-square")
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
        if args.threshold <= 0 or args.ks_threshold <= 0 or not 0 < args.alpha < 1:
            raise BadInput("--threshold and --ks-threshold must be > 0 and --alpha in (0, 1)")
        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        reference, current = read_csv(args.reference, "reference"), read_csv(args.current, "current")
        results = compare(reference, current, columns, args)
        if args.html:
            html_report.write_html(build_report(results, reference, current, args), args.html)
    except BadInput as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"drift: cannot write the HTML report {args.html}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    drifted = any(r.drifted for r in results)
    if args.json:
        print(json.dumps({"drifted": drifted, "columns": [asdict(r) for r in results],
                          "thresholds": {"psi": args.threshold, "ks": args.ks_threshold, "alpha": args.alpha}},
                         indent=2))
    else:
        print(render_table(results))
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
