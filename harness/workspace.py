"""A ready-to-serve workspace: seeded data, a stored model, and a Feast repo applied and materialized.

Used by the demo (on the project's own `feature_repo/`), and by the tests and benchmarks (on a copy).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle import data as datamod
from lifecycle import model_store
from mlops.settings import Settings
from tools.feast_cli import apply_and_materialize, feast_env

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Workspace:
    root: Path
    env_file: Path
    feature_repo: Path
    settings: Settings
    model: model_store.StoredModel
    dataset: datamod.Dataset
    env: dict[str, str] = field(default_factory=dict)


def copy_feature_repo(dest: Path) -> Path:
    shutil.copytree(ROOT / "feature_repo", dest, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return dest


def prepare(root: Path, env_file: Path, feature_repo: Path, *, n_customers: int = 2_000,
            n_transactions: int = 40_000, seed: int = 42, version: str | None = None,
            model_name: str | None = None, params: dict | None = None) -> Workspace:
    """Seeded data → trained ONNX model (an MLflow run, a registered version) → `feast apply` + `feast materialize`."""
    from lifecycle.train import register, train

    settings = Settings.load(env_file).model_copy(update={"feature_repo": feature_repo})
    dataset = datamod.generate(n_customers, n_transactions, seed=seed)
    datamod.write(dataset, feature_repo / "data")
    trained = train(dataset, params)
    stored = register(trained, model_name or settings.model_name, version)
    env = feast_env(env_file)
    env.update({"MLOPS_FEATURE_REPO": str(feature_repo), "MLOPS_MODEL_VERSION": stored.version,
                "MLOPS_SPOOL_PATH": str(root / "spool" / "predictions.jsonl"), "PYTHONUNBUFFERED": "1"})
    apply_and_materialize(feature_repo, env)
    return Workspace(root, env_file, feature_repo, settings, stored, dataset, env)
