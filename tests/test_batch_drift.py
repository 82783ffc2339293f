"""The `drift` command on two CSV files: statistics, exit codes, JSON, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from streaming.batch_drift import main


@pytest.fixture
def csvs(tmp_path: Path):
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"amount": rng.lognormal(3, 0.5, 3000), "age": rng.normal(40, 10, 3000),
                        "channel": rng.choice(["web", "app", "pos"], 3000, p=[0.5, 0.3, 0.2])})
    same = pd.DataFrame({"amount": rng.lognormal(3, 0.5, 1500), "age": rng.normal(40, 10, 1500),
                         "channel": rng.choice(["web", "app", "pos"], 1500, p=[0.5, 0.3, 0.2])})
    shifted = same.assign(amount=same["amount"] * 2.5,
                          channel=rng.choice(["web", "app", "pos"], 1500, p=[0.2, 0.3, 0.5]))
    paths = {}
    for name, frame in {"ref": ref, "same": same, "shifted": shifted}.items():
        paths[name] = tmp_path / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    return paths


def run(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "streaming.batch_drift", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_no_drift_exits_0(csvs, capsys):
    assert main(["--reference", str(csvs["ref"]), "--current", str(csvs["same"])]) == 0
    out = capsys.readouterr().out
    assert "0 of 3 columns drifted" in out


def test_drift_exits_1_and_json_has_exact_ks_and_chi2(csvs, capsys):
    assert main(["--reference", str(csvs["ref"]), "--current", str(csvs["shifted"]), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    by_col = {c["column"]: c for c in report["columns"]}
    assert report["drifted"] is True
    assert by_col["amount"]["drifted"] and by_col["channel"]["drifted"] and not by_col["age"]["drifted"]
    together = report["multivariate"]  # amount and age together (their PCA reconstruction error)
    assert together["column"] == "multivariate_reconstruction_error" and together["drifted"]
    assert {"psi", "ks", "wasserstein", "ks_exact", "ks_pvalue"} <= set(together["scores"])
    ref, cur = pd.read_csv(csvs["ref"]), pd.read_csv(csvs["shifted"])
    exact = sps.ks_2samp(ref["amount"], cur["amount"])
    assert by_col["amount"]["test"] == "ks"
    assert by_col["amount"]["statistic"] == pytest.approx(exact.statistic)
    assert by_col["amount"]["p_value"] == pytest.approx(exact.pvalue, abs=1e-300)
    assert by_col["channel"]["test"] == "chi2" and by_col["channel"]["p_value"] < 1e-6
    assert by_col["amount"]["psi"] > 0.2


def test_columns_and_threshold_flags(csvs, capsys):
    assert main(["--reference", str(csvs["ref"]), "--current", str(csvs["shifted"]), "--columns", "age"]) == 0
    assert "age" in capsys.readouterr().out
    # A PSI threshold above the shift's PSI and a strict alpha: amount no longer counts as drifted.
    code = main(["--reference", str(csvs["ref"]), "--current", str(csvs["shifted"]), "--columns", "amount",
                 "--threshold", "50", "--ks-threshold", "0.99"])
    assert code == 0


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda p: ["--reference", str(p["ref"].with_name("missing.csv")), "--current", str(p["same"])],
     "reference file not found"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["same"]), "--columns", "amount,height"],
     "columns not in both files: height"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["nonnum"])], "non-numeric value 'lots'"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["other"])], "share no columns"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["empty"])], "not a readable CSV"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["same"]), "--alpha", "2"], "--alpha"),
    (lambda p: ["--reference", str(p["ref"])], "required: --current"),
    (lambda p: ["--reference", str(p["ref"]), "--current", str(p["same"]), "--columns", "amount", "--include", "age"],
     "argument --include: not allowed with argument --columns"),  # --columns would silently win
])
def test_bad_input_exits_2_with_one_line(csvs, tmp_path, make_args, message):
    pd.DataFrame({"amount": [1.0, "lots", 3.0]}).to_csv(tmp_path / "nonnum.csv", index=False)
    pd.DataFrame({"height": [1.0, 2.0]}).to_csv(tmp_path / "other.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    paths = {**csvs, "nonnum": tmp_path / "nonnum.csv", "other": tmp_path / "other.csv",
             "empty": tmp_path / "empty.csv"}
    code, out, err = run(*make_args(paths))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def strict_json(text: str) -> dict:
    """JSON as the standard defines it: NaN and Infinity are not numbers there."""
    def refuse(name: str):
        raise AssertionError(f"{name} in the JSON output")
    return json.loads(text, parse_constant=refuse)


def test_one_category_column_has_a_defined_p_value_and_no_nan_in_json(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for name, n in (("ref", 500), ("cur", 300)):
        pd.DataFrame({"amount": rng.normal(10, 2, n), "country": ["DE"] * n}).to_csv(tmp_path / f"{name}.csv",
                                                                                   index=False)
    code = main(["--reference", str(tmp_path / "ref.csv"), "--current", str(tmp_path / "cur.csv"), "--json"])
    out = capsys.readouterr().out
    report = strict_json(out)
    country = {c["column"]: c for c in report["columns"]}["country"]
    assert (country["statistic"], country["p_value"], country["drifted"]) == (0.0, 1.0, False), country
    assert code == 0 and "NaN" not in out


@pytest.mark.parametrize(("flag", "value"), [
    ("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "-1"), ("--threshold", "0"),
    ("--ks-threshold", "nan"), ("--ks-threshold", "1.5"), ("--ks-threshold", "-inf"),
    ("--alpha", "nan"), ("--alpha", "1"), ("--alpha", "0"),
])
def test_non_finite_or_out_of_range_thresholds_exit_2(csvs, flag, value):
    code, out, err = run("--reference", str(csvs["ref"]), "--current", str(csvs["shifted"]), f"{flag}={value}")
    assert code == 2 and out == "", (code, out, err)
    assert len(err.strip().splitlines()) == 1 and flag in err and value in err, err


@pytest.fixture
def with_ids(tmp_path: Path):
    """Same-distribution features plus what every export has: ids, a row-unique token, event times."""
    rng = np.random.default_rng(2)

    def frame(n: int, start: str, first_id: int) -> pd.DataFrame:
        return pd.DataFrame({
            "transaction_id": np.arange(first_id, first_id + n),
            "customerId": rng.integers(0, 50_000, n),
            "session": [f"s-{rng.integers(1 << 62):x}" for _ in range(n)],
            "timestamp": pd.date_range(start, periods=n, freq="min").strftime("%Y-%m-%dT%H:%M:%SZ"),
            "when": pd.date_range(start, periods=n, freq="h").strftime("%Y-%m-%d %H:%M:%S"),
            "amount": rng.lognormal(3, 0.5, n),
            "channel": rng.choice(["web", "app", "pos"], n, p=[0.5, 0.3, 0.2]),
        })

    paths = {"ref": tmp_path / "ref.csv", "cur": tmp_path / "cur.csv"}
    frame(3000, "2024-01-01", 0).to_csv(paths["ref"], index=False)
    frame(1500, "2024-06-01", 10_000).to_csv(paths["cur"], index=False)
    return paths


def test_identifier_and_time_columns_are_skipped_by_default_and_said_so(with_ids, capsys):
    args = ["--reference", str(with_ids["ref"]), "--current", str(with_ids["cur"])]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 of 2 columns drifted" in out, out
    skipped_line = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped_line) == 1, out
    for column in ("transaction_id", "customerId", "session", "timestamp", "when"):
        assert column in skipped_line[0], out
    assert main([*args, "--json"]) == 0
    report = strict_json(capsys.readouterr().out)
    assert [c["column"] for c in report["columns"]] == ["amount", "channel"]
    reasons = {s["column"]: s["reason"] for s in report["skipped"]}
    assert reasons == {"transaction_id": "identifier-like name", "customerId": "identifier-like name",
                       "session": "unique per row", "timestamp": "timestamp-like name",
                       "when": "datetime values"}, reasons


def test_skipped_columns_can_be_opted_back_in(with_ids, capsys):
    args = ["--reference", str(with_ids["ref"]), "--current", str(with_ids["cur"]), "--json"]
    assert main([*args, "--include", "timestamp,transaction_id"]) == 1  # other ids, later times: drifted
    report = strict_json(capsys.readouterr().out)
    assert {c["column"] for c in report["columns"]} == {"amount", "channel", "timestamp", "transaction_id"}
    assert {s["column"] for s in report["skipped"]} == {"customerId", "session", "when"}
    assert main([*args, "--columns", "transaction_id,amount"]) == 1  # --columns: exactly these, nothing skipped
    report = strict_json(capsys.readouterr().out)
    assert [c["column"] for c in report["columns"]] == ["transaction_id", "amount"] and report["skipped"] == []


def test_only_identifier_columns_is_bad_input(tmp_path):
    for name in ("ref", "cur"):
        pd.DataFrame({"id": range(50), "created_at": pd.date_range("2024-01-01", periods=50, freq="D")}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    code, out, err = run("--reference", str(tmp_path / "ref.csv"), "--current", str(tmp_path / "cur.csv"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--include" in err and "id" in err, err


def test_include_of_a_missing_column_is_bad_input(csvs):
    code, _, err = run("--reference", str(csvs["ref"]), "--current", str(csvs["same"]), "--include", "height")
    assert code == 2 and "height" in err and len(err.strip().splitlines()) == 1, err
