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
