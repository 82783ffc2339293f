"""The demo's batch step: `mlops-score` over the demo's transactions with Production (features point-in-time
from Feast's offline store), then a backfill of the last hour of logged traffic with another registered
version, compared with what Production answered on the same requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from lifecycle.registry import Registry


def score(env: dict[str, str], *args: str) -> dict | None:
    command = [sys.executable, "-m", "lifecycle.batch.cli", "--no-progress", "--json", *args]
    print("  $ mlops-score " + " ".join(args))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        print(f"  mlops-score failed ({result.returncode}): {result.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout)


def demo_batch(registry: Registry, name: str, feature_repo: Path, env: dict[str, str], run_dir: Path) -> bool:
    out = run_dir / "batch"
    shutil.rmtree(out, ignore_errors=True)  # each demo run scores afresh (a folder is one job: resumable)
    transactions = feature_repo / "data" / "transactions.parquet"
    batch = score(env, "--input", str(transactions), "--output", str(out / "transactions"))
    if batch is None:
        return False
    scored = pd.read_parquet(out / "transactions")
    accuracy = float((scored["label"] == scored["is_fraud"]).mean())
    why = "; ".join(f"{n:,} {reason}" for reason, n in batch["rejected_by_reason"].items())
    print(f"  {batch['model_name']}:{batch['model_version']} ({batch['engine']}): {batch['read']:,} transactions, "
          f"{batch['scored']:,} scored, {batch['rejected']:,} rejected{f' ({why})' if why else ''} in "
          f"{batch['seconds']:.1f} s; accuracy against is_fraud {accuracy:.4f}")
    production = registry.production(name)
    others = [v for v in registry.list(name) if production is None or v.version != production.version]
    if not others:
        print("  no other version to backfill with", file=sys.stderr)
        return False
    candidate = others[-1].version
    backfill = score(env, "--log-since", "1h", "--model", f"models:/{name}/{candidate}", "--output",
                     str(out / f"backfill-{candidate}"))
    if backfill is None or not backfill["scored"]:
        return False
    rows = pd.read_parquet(out / f"backfill-{candidate}", columns=["served_version", "served_prediction",
                                                                    "prediction", "label"])
    served_label = (rows["served_prediction"] >= 0.5).astype(int)
    print(f"  backfill of the last hour with {name}:{candidate} ({backfill['engine']}, features as logged): "
          f"{backfill['read']:,} logged predictions, {backfill['scored']:,} scored, {backfill['rejected']:,} rejected "
          f"in {backfill['seconds']:.1f} s; served by {', '.join(sorted(rows['served_version'].unique()))}; the "
          f"candidate's label agrees with the served one on {(rows['label'] == served_label).mean():.1%}, mean "
          f"|score difference| {(rows['prediction'] - rows['served_prediction']).abs().mean():.4f}")
    print(f"  output: {out}/*/part-*.parquet (rejects in _rejects/, counts in _summary.json)")
    return True
