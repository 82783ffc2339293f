"""The HTML drift report: content, ordering, self-containment, the `drift --html` CLI, and real rendering.

Rendering is checked in Debian's headless Chromium (scripts/install.sh): `--dump-dom` gives the DOM the
browser built (one chart per column, two bars per bin) and `--screenshot` the pixels, where both bar
colours must cover a real area: the charts are drawn, not just present in the markup.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops import stats
from streaming import report
from streaming.batch_drift import main as drift_main

BARS = 40 + 40 + 2 + 1  # bins per column of streaming_style_report(): 40 profile-like bins, 2 labels, 1
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium not found: run scripts/install.sh (Debian package chromium)"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)


def streaming_style_report() -> report.DriftReport:
    """What the streaming consumer would fill in: profile bin edges and window counts per column."""
    rng = np.random.default_rng(3)
    ref_values, cur_values = rng.lognormal(3, 0.5, 5000), rng.lognormal(3, 0.5, 1200) * 4
    edges = stats.quantile_edges(ref_values, 40)
    ref, cur = stats.histogram(edges, ref_values), stats.histogram(edges, cur_values)
    near_ref, near_cur = stats.histogram(edges, rng.lognormal(3, 0.5, 5000)), stats.histogram(edges, ref_values[:1200])
    return report.DriftReport(
        title="Drift of fraud_detector v1, last hour", model_name="fraud_detector", model_version="v1",
        window_start="2026-11-24T10:00:00+00:00", window_end="2026-11-24T11:00:00+00:00",
        thresholds={"psi": 0.2, "ks": 0.15}, source="stream: topic predictions, group drift-detector",
        columns=[
            report.ColumnDrift("days_since_last_order", "numeric", report.numeric_bin_labels(edges), near_ref,
                               near_cur, {"psi": stats.psi(near_ref, near_cur), "ks": 0.02}, "ok"),
            report.ColumnDrift("transaction_amount", "numeric", report.numeric_bin_labels(edges), ref, cur,
                               {"psi": stats.psi(ref, cur), "ks": stats.ks_from_histograms(ref, cur)}, "critical",
                               "PSI > 0.2"),
            report.ColumnDrift("label", "categorical", ["0", "1"], [950, 50], [880, 120],
                               {"psi": stats.psi([950, 50], [880, 120]), "chi2_pvalue": 1e-9}, "warning"),
            report.ColumnDrift("<script>alert(1)</script>", "categorical", ["a&b"], [1], [1], {"psi": 0.0}, "ok"),
        ])


def test_columns_sorted_by_severity_then_psi():
    html = report.render_html(streaming_style_report())
    order = re.findall(r'<section class="feature" id="col-([^"]+)" data-verdict="(\w+)"', html)
    assert [v for _, v in order] == ["critical", "warning", "ok", "ok"]
    assert order[0][0] == "transaction_amount" and order[2][0] == "days_since_last_order"  # larger PSI first


def test_report_holds_model_time_range_scores_and_escapes_names():
    html = report.render_html(streaming_style_report())
    assert 'class="model">fraud_detector v1<' in html
    assert "2026-11-24T10:00:00+00:00" in html and "2026-11-24T11:00:00+00:00" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&amp;b" in html
    assert html.count('<svg class="hist"') == 4
    assert html.count('class="bar ref"') == html.count('class="bar cur"') == BARS
    assert "1 critical" in html and "1 warning" in html and "2 ok" in html


def test_the_latest_skew_check_is_a_table_worst_feature_first():
    skew = report.SkewSection(datetime(2026, 11, 24, 11, 5, tzinfo=UTC), 500, 1e-6, 0.01, [
        {"feature": "order_count_30d", "rows": 500, "differing": 0, "share": 0.0, "max_abs_diff": 0.0,
         "missing_offline": 0},
        {"feature": "avg_order_value", "rows": 480, "differing": 48, "share": 0.1, "max_abs_diff": 31.5,
         "missing_offline": 20}])
    html = report.render_html(dataclasses.replace(streaming_style_report(), skew=skew))
    rows = re.findall(r'<tr data-verdict="(\w+)"><td>(\w+)</td>', html.split('<table class="skew">')[1])
    assert rows == [("warning", "avg_order_value"), ("ok", "order_count_30d")]
    assert "2026-11-24T11:05:00+00:00" in html and "500 newest predictions" in html
    assert '<table class="skew">' not in report.render_html(streaming_style_report())


def test_report_is_self_contained():
    html = report.render_html(streaming_style_report())
    assert not re.search(r"<(script|link|img|iframe|object)\b", html, re.I)
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?(https?:|//)", html, re.I)
    assert re.findall(r"https?://[^\s\"'<>]+", html) == ["http://www.w3.org/2000/svg"] * 4  # a namespace, no load
    assert "@import" not in html and "url(" not in html


def test_many_categories_fold_into_other_and_bad_input_is_refused():
    names = [f"cat{i:03d}" for i in range(100)]
    column = report.ColumnDrift("merchant", "categorical", names, list(range(100)), list(range(100)), {}, "ok")
    svg = report.histogram_svg(column)
    assert svg.count('class="bar ref"') == report.MAX_BARS and "other (61)" in svg
    with pytest.raises(ValueError, match="differ in length"):
        report.ColumnDrift("x", "numeric", ["a", "b"], [1], [1, 2], {}, "ok")
    with pytest.raises(ValueError, match="verdict"):
        report.ColumnDrift("x", "numeric", ["a"], [1], [1], {}, "bad")  # type: ignore[arg-type]
    assert report.numeric_bin_labels([1.0, 2.5]) == ["≤ 1", "(1, 2.5]", "> 2.5"]


@pytest.fixture
def csvs(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"amount": rng.lognormal(3, 0.5, 3000), "age": rng.normal(40, 10, 3000),
                        "channel": rng.choice(["web", "app", "pos"], 3000, p=[0.5, 0.3, 0.2])})
    cur = pd.DataFrame({"amount": rng.lognormal(3, 0.5, 1500) * 2.5, "age": rng.normal(40, 10, 1500),
                        "channel": rng.choice(["web", "app", "pos"], 1500, p=[0.42, 0.33, 0.25]),
                        "timestamp": pd.date_range("2026-11-01", periods=1500, freq="min", tz="UTC")})
    paths = {"ref": tmp_path / "ref.csv", "cur": tmp_path / "cur.csv"}
    ref.to_csv(paths["ref"], index=False)
    cur.to_csv(paths["cur"], index=False)
    return paths


def test_drift_cli_writes_the_report(csvs, tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    code = drift_main(["--reference", str(csvs["ref"]), "--current", str(csvs["cur"]), "--columns",
                       "amount,age,channel", "--html", str(out), "--model", "fraud_detector:v3"])
    assert code == 1  # the exit code still says drift
    html = out.read_text()
    assert "fraud_detector v3" in html and "2026-11-01T00:00:00+00:00" in html and "2026-11-02T00:59:00+00:00" in html
    verdicts = dict(re.findall(r'<section class="feature" id="col-(\w+)" data-verdict="(\w+)"', html))
    assert verdicts == {"amount": "critical", "multivariate_reconstruction_error": "critical", "channel": "warning",
                        "age": "ok"}  # amount moved, so did the numeric columns together
    assert [v for v in verdicts if v != "multivariate_reconstruction_error"] == ["amount", "channel", "age"]
    bars = {re.search(r'id="col-(\w+)"', part).group(1): part.count('class="bar ref"')
            for part in html.split('<section class="feature"')[1:]}
    assert (bars["amount"], bars["age"], bars["channel"]) == (40, 40, 4)  # 40 profile bins; 3 categories + unseen
    assert 10 <= bars["multivariate_reconstruction_error"] <= 40  # quantile bins of the errors, ties merged
    assert "2 of 3 columns drifted" in capsys.readouterr().out


def test_drift_cli_cannot_write_the_report_exits_2_with_one_line(csvs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "streaming.batch_drift", "--reference",
                           str(csvs["ref"]), "--current", str(csvs["cur"]), "--html", str(blocker / "report.html")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("drift: cannot write the HTML report") and len(proc.stderr.splitlines()) == 1


def test_chromium_draws_every_chart(tmp_path):
    page = report.write_html(streaming_style_report(), tmp_path / "report.html")
    dom = chromium(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<svg class="hist"') == 4
    assert len(re.findall(r'<rect class="bar (?:ref|cur)"', dom.stdout)) == 2 * (BARS)

    shot = tmp_path / "report.png"
    result = chromium(page, f"--screenshot={shot}", "--window-size=1000,2400")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)

    def covered(hex_colour: str) -> float:
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return float((np.abs(pixels - rgb).sum(axis=1) <= 12).mean())

    assert covered("#ffffff") < 0.97, "the page is blank"
    assert covered(report.REF_COLOUR) > 0.005 and covered(report.CUR_COLOUR) > 0.005, \
        (covered(report.REF_COLOUR), covered(report.CUR_COLOUR))
