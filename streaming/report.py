"""A drift report people look at: one self-contained HTML file, per feature reference vs current histograms.

Both drift paths fill the same input: the batch `drift --html` tool from two CSV files, and the streaming
consumer from its window counts over the reference profile's bins. Per column: bin labels, reference and
current counts, the scores (PSI, KS, chi-square) and a verdict; plus model name/version and time range.
The output loads nothing from the network (inline SVG, inline CSS, no script), so it opens anywhere,
offline, and can be mailed or attached to an incident as it is. Columns are sorted by severity.

    report = DriftReport(title=..., model_name=..., model_version=..., window_start=..., window_end=...,
                         columns=[ColumnDrift(name, "numeric", numeric_bin_labels(edges), ref, cur, scores, verdict)])
    write_html(report, Path("report.html"))
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Verdict = Literal["ok", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"ok": 0, "warning": 1, "critical": 2}
MAX_BARS = 40  # categorical columns with more categories keep the largest ones and fold the rest into "other"
REF_COLOUR = "#4c78a8"
CUR_COLOUR = "#f58518"
VERDICT_COLOUR = {"ok": "#2e7d32", "warning": "#b26a00", "critical": "#c62828"}
SCORE_LABELS = {"psi": "PSI", "ks": "KS", "ks_exact": "KS (exact)", "ks_pvalue": "KS p", "chi2": "χ²",
                "chi2_pvalue": "χ² p", "cramers_v": "Cramér's V", "wasserstein": "Wasserstein", "jensen_shannon": "JS",
                "kl": "KL", "hellinger": "Hellinger"}


@dataclass(frozen=True)
class ColumnDrift:
    """One feature (or the model's output): what the reference and the current data hold, and the verdict."""

    name: str
    kind: Literal["numeric", "categorical"]
    bins: Sequence[str]
    reference: Sequence[float]
    current: Sequence[float]
    scores: dict[str, float]
    verdict: Verdict
    reason: str = ""

    def __post_init__(self) -> None:
        if not len(self.bins) == len(self.reference) == len(self.current):
            raise ValueError(f"column {self.name!r}: bins, reference and current counts differ in length")
        if self.verdict not in SEVERITY_RANK:
            raise ValueError(f"column {self.name!r}: verdict must be ok, warning or critical, not {self.verdict!r}")


@dataclass(frozen=True)
class SkewSection:
    """The latest row-level training/serving skew check (:mod:`streaming.skew`): per store feature a mapping
    with ``feature``, ``rows``, ``differing``, ``share``, ``max_abs_diff`` and ``missing_offline``."""

    checked_at: datetime
    sampled: int
    tolerance: float
    threshold: float
    features: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class DriftReport:
    title: str
    columns: Sequence[ColumnDrift]
    model_name: str | None = None
    model_version: str | None = None
    window_start: datetime | str | None = None
    window_end: datetime | str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str = ""
    skew: SkewSection | None = None
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def numeric_bin_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the bins that interior edges e0 < e1 < ... define: ≤ e0, (e0, e1], ..., > e_last."""
    if not len(edges):
        return ["all values"]
    fmt = [f"{e:.4g}" for e in edges]
    return [f"≤ {fmt[0]}"] + [f"({a}, {b}]" for a, b in zip(fmt, fmt[1:], strict=False)] + [f"> {fmt[-1]}"]


def sorted_columns(columns: Sequence[ColumnDrift]) -> list[ColumnDrift]:
    """Critical first, then warning, then ok; inside each, the largest PSI first."""
    return sorted(columns, key=lambda c: (-SEVERITY_RANK[c.verdict], -_finite(c.scores.get("psi", 0.0)), c.name))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _shares(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [float(c) / total if total > 0 else 0.0 for c in counts]


def _fold_categories(column: ColumnDrift) -> tuple[list[str], list[float], list[float]]:
    bins, ref, cur = list(column.bins), [float(x) for x in column.reference], [float(x) for x in column.current]
    if column.kind != "categorical" or len(bins) <= MAX_BARS:
        return bins, ref, cur
    order = sorted(range(len(bins)), key=lambda i: -(ref[i] + cur[i]))
    keep, rest = sorted(order[:MAX_BARS - 1]), order[MAX_BARS - 1:]
    return ([bins[i] for i in keep] + [f"other ({len(rest)})"], [ref[i] for i in keep] + [sum(ref[i] for i in rest)],
            [cur[i] for i in keep] + [sum(cur[i] for i in rest)])


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def histogram_svg(column: ColumnDrift, width: int = 880, height: int = 260) -> str:
    """Grouped bars: the share of reference (blue) and current (orange) values per bin, on one scale."""
    bins, ref, cur = _fold_categories(column)
    ref_p, cur_p = _shares(ref), _shares(cur)
    left, right, top, bottom = 48, 12, 14, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(ref_p + cur_p + [1e-9])
    slot = plot_w / len(bins)
    bar_w = max(1.0, slot * 0.4)
    parts = [f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" data-bins="{len(bins)}" '
             f'aria-label="{_esc(column.name)}: reference vs current share per bin">']
    for frac in (0.0, 0.5, 1.0):  # gridlines with the share they stand for
        y = top + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{peak * frac:.0%}</text>')
    label_every = max(1, math.ceil(len(bins) / 20))
    for i, label in enumerate(bins):
        x0 = left + i * slot + (slot - 2 * bar_w) / 2
        for cls, share, x in (("ref", ref_p[i], x0), ("cur", cur_p[i], x0 + bar_w)):
            h = plot_h * share / peak
            parts.append(f'<rect class="bar {cls}" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}"><title>{_esc(label)}: {"reference" if cls == "ref" else "current"} '
                         f'{share:.1%}</title></rect>')
        if i % label_every == 0:
            cx = left + (i + 0.5) * slot
            parts.append(f'<text class="xlabel" x="{cx:.1f}" y="{top + plot_h + 12}" '
                         f'transform="rotate(35 {cx:.1f} {top + plot_h + 12})">{_esc(label[:18])}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _when(value: datetime | str | None) -> str:
    if value is None or value == "":
        return "not recorded"
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)


def _score(value: float | None) -> str:
    if value is None:
        return "–"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


CSS = f"""
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 960px;
       color: #1d1d1f; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 17px; margin: 0; }}
.meta {{ color: #555; margin: 0 0 16px; }} .meta b {{ color: #1d1d1f; }}
table {{ border-collapse: collapse; width: 100%; margin: 8px 0 20px; }}
th, td {{ text-align: left; padding: 4px 8px; border-bottom: 1px solid #e4e4e4; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.badge {{ display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 12px; }}
{"".join(f".badge.{v} {{ background: {c}; }} " for v, c in VERDICT_COLOUR.items())}
section.feature {{ border: 1px solid #e4e4e4; border-radius: 8px; padding: 12px 16px; margin: 16px 0; }}
section.feature header {{ display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }}
.reason {{ color: #555; }}
.bar.ref {{ fill: {REF_COLOUR}; }} .bar.cur {{ fill: {CUR_COLOUR}; }}
.grid {{ stroke: #eee; }} .axis {{ stroke: #999; }} .tick, .xlabel {{ font-size: 10px; fill: #555; }}
.legend span {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
"""


def render_html(report: DriftReport) -> str:
    columns = sorted_columns(report.columns)
    counts = {v: sum(c.verdict == v for c in columns) for v in SEVERITY_RANK}
    model = " ".join(x for x in (report.model_name, report.model_version) if x) or "not given"
    thresholds = ", ".join(f"{SCORE_LABELS.get(k, k)} {v:g}" for k, v in report.thresholds.items())
    score_keys = [k for k in SCORE_LABELS if any(k in c.scores for c in columns)]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_esc(report.title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{_esc(report.title)}</h1>",
           f'<p class="meta">Model <b class="model">{_esc(model)}</b> · from <b class="window-start">'
           f'{_esc(_when(report.window_start))}</b> to <b class="window-end">{_esc(_when(report.window_end))}</b>'
           f" · generated {_esc(_when(report.generated_at))}"
           + (f"<br>{_esc(report.source)}" if report.source else "")
           + (f"<br>Thresholds: {_esc(thresholds)}" if thresholds else "") + "</p>",
           f'<p class="summary"><span class="badge critical">{counts["critical"]} critical</span> '
           f'<span class="badge warning">{counts["warning"]} warning</span> '
           f'<span class="badge ok">{counts["ok"]} ok</span> of {len(columns)} columns</p>',
           '<table class="scores"><thead><tr><th>column</th><th>type</th><th>verdict</th>'
           + "".join(f'<th class="num">{_esc(SCORE_LABELS[k])}</th>' for k in score_keys) + "</tr></thead><tbody>"]
    for c in columns:
        out.append(f'<tr data-verdict="{c.verdict}"><td><a href="#col-{_esc(c.name)}">{_esc(c.name)}</a></td>'
                   f'<td>{c.kind}</td><td><span class="badge {c.verdict}">{c.verdict}</span></td>'
                   + "".join(f'<td class="num">{_score(c.scores.get(k))}</td>' for k in score_keys) + "</tr>")
    out.append("</tbody></table>")
    if report.skew is not None:
        out.append(skew_html(report.skew))
    for c in columns:
        n_ref, n_cur = sum(c.reference), sum(c.current)
        out.append(f'<section class="feature" id="col-{_esc(c.name)}" data-verdict="{c.verdict}"><header>'
                   f'<h2>{_esc(c.name)}</h2><span class="badge {c.verdict}">{c.verdict}</span>'
                   f'<span class="reason">{_esc(c.reason)}</span></header>'
                   f'<p class="legend"><span style="background:{REF_COLOUR}"></span>reference ({n_ref:,.0f})'
                   f'<span style="background:{CUR_COLOUR}"></span>current ({n_cur:,.0f})</p>'
                   f"{histogram_svg(c)}</section>")
    out.append("</body></html>")
    return "\n".join(out)


def skew_html(skew: SkewSection) -> str:
    """The skew table: a feature is ``warning`` when its share of differing rows is above the threshold."""
    rows = []
    for f in sorted(skew.features, key=lambda f: (-f["share"], f["feature"])):
        verdict = "warning" if f["share"] > skew.threshold else "ok"
        rows.append(f'<tr data-verdict="{verdict}"><td>{_esc(f["feature"])}</td>'
                    f'<td><span class="badge {verdict}">{verdict}</span></td>'
                    f'<td class="num">{f["rows"]}</td><td class="num">{f["differing"]}</td>'
                    f'<td class="num">{f["share"]:.4f}</td><td class="num">{_score(f["max_abs_diff"])}</td>'
                    f'<td class="num">{f["missing_offline"]}</td></tr>')
    return ('<section class="skew"><h2>Training/serving skew</h2>'
            f'<p class="meta">Checked {_esc(_when(skew.checked_at))}: the features of the {skew.sampled} newest '
            "predictions against Feast's offline store at each prediction's time; a row differs beyond a relative "
            f"{skew.tolerance:g}; skew above a share of {skew.threshold:g}.</p>"
            '<table class="skew"><thead><tr><th>feature</th><th>verdict</th><th class="num">rows</th>'
            '<th class="num">differing</th><th class="num">share</th><th class="num">max abs diff</th>'
            '<th class="num">no offline value</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></section>")


def write_html(report: DriftReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
