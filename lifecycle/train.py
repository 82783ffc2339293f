"""Train the fraud model, export it to ONNX with a parity check, and store it with its metadata.

Every training is an MLflow run (:mod:`lifecycle.tracking`): its parameters, holdout metrics, the training
data's hash and the git commit (when there is one), the ONNX model with signature and input example, and the
drift reference profile. The training set joins each transaction with the customer stats as they were then
(point-in-time, :func:`lifecycle.data.training_frame`).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from pydantic import ValidationError
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import train_test_split

from lifecycle import data as datamod
from lifecycle import model_store
from lifecycle.cli_backend import BackendUnavailable, fail_fast, open_backend
from lifecycle.onnx_export import ParityError, check_parity, export, onnx_positive_proba
from lifecycle.tracking import Backend, TrackingError, TrainingRun, git_commit, training_run
from mlops.calibration import CALIBRATION_FILE, Calibration
from mlops.cli_args import OneLineParser, settings_error
from mlops.profile import PROFILE_FILE, ReferenceProfile, build_profile
from mlops.schema import LABEL, MODEL_FEATURES
from mlops.settings import Settings

DEFAULT_PARAMS: dict[str, Any] = {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.1, "random_state": 0}


@dataclass
class TrainedModel:
    estimator: GradientBoostingClassifier
    onnx_bytes: bytes
    metrics: dict[str, float]
    params: dict[str, Any]
    data_hash: str
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    x_train: np.ndarray


def data_hash(x: np.ndarray, y: np.ndarray) -> str:
    """Content hash of the training matrix (independent of file layout and timestamps)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def split(dataset: datamod.Dataset, holdout: float = 0.25, seed: int = 0):
    """(x_train, x_holdout, y_train, y_holdout) of the point-in-time training frame, stratified on the label."""
    return split_frame(datamod.training_frame(dataset), holdout, seed)


def split_frame(frame, holdout: float = 0.25, seed: int = 0):
    x = frame[list(MODEL_FEATURES)].to_numpy(dtype=np.float64)
    y = frame[LABEL].to_numpy(dtype=np.int64)
    return train_test_split(x, y, test_size=holdout, random_state=seed, stratify=y)


def fit(x_train: np.ndarray, y_train: np.ndarray, params: dict[str, Any] | None = None) -> GradientBoostingClassifier:
    return GradientBoostingClassifier(**{**DEFAULT_PARAMS, **(params or {})}).fit(x_train, y_train)


def score_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The holdout metrics: what realised and estimated quality in production are compared with."""
    predicted = proba >= 0.5
    return {"auc": float(roc_auc_score(y_true, proba)), "accuracy": float(accuracy_score(y_true, predicted)),
            "precision": float(precision_score(y_true, predicted, zero_division=0)),
            "recall": float(recall_score(y_true, predicted, zero_division=0)),
            "f1": float(f1_score(y_true, predicted, zero_division=0)),
            "brier": float(brier_score_loss(y_true, proba))}


def evaluate(estimator: GradientBoostingClassifier, x_holdout: np.ndarray, y_holdout: np.ndarray,
             tolerance: float = 1e-5) -> tuple[bytes, dict[str, float]]:
    """ONNX export with its parity check, and the holdout metrics of what will be served."""
    onnx_bytes = export(estimator, x_holdout.shape[1])
    parity = check_parity(onnx_bytes, estimator, x_holdout, tolerance)
    metrics = score_metrics(y_holdout, onnx_positive_proba(onnx_bytes, x_holdout))
    return onnx_bytes, {**metrics, "onnx_parity_max_abs_diff": parity, "n_holdout": int(len(y_holdout))}


def assemble(estimator: GradientBoostingClassifier, onnx_bytes: bytes, metrics: dict[str, float],
             params: dict[str, Any] | None, x_tr: np.ndarray, x_te: np.ndarray, y_tr: np.ndarray,
             y_te: np.ndarray) -> TrainedModel:
    """The record of one training run: effective params and the hash of all rows it saw."""
    x_all, y_all = np.vstack([x_tr, x_te]), np.concatenate([y_tr, y_te])
    return TrainedModel(estimator, onnx_bytes, {**metrics, "n_train": int(len(y_tr))},
                        {**DEFAULT_PARAMS, **(params or {})}, data_hash(x_all, y_all), x_te, y_te, x_tr)


def train(dataset: datamod.Dataset, params: dict[str, Any] | None = None, holdout: float = 0.25) -> TrainedModel:
    x_tr, x_te, y_tr, y_te = split(dataset, holdout)
    estimator = fit(x_tr, y_tr, params)
    onnx_bytes, metrics = evaluate(estimator, x_te, y_te)
    return assemble(estimator, onnx_bytes, metrics, params, x_tr, x_te, y_tr, y_te)


def reference_profile(trained: TrainedModel, name: str, version: str) -> ReferenceProfile:
    """Drift reference: the training features and the served (ONNX) model's scores on them."""
    scores = onnx_positive_proba(trained.onnx_bytes, trained.x_train)
    features = {f: trained.x_train[:, i] for i, f in enumerate(MODEL_FEATURES)}
    return build_profile(name, version, features, scores)


def log_training(run: TrainingRun, trained: TrainedModel) -> None:
    """What a person browsing the experiment needs: parameters, holdout metrics, the data's fingerprint."""
    run.log_params({**trained.params, "n_features": len(MODEL_FEATURES), "features": list(MODEL_FEATURES)})
    run.log_metrics(trained.metrics)
    run.set_tags({"training_data_hash": trained.data_hash})


def register(trained: TrainedModel, name: str, version: str | None = None, *, run: TrainingRun | None = None,
             backend: Backend | None = None) -> model_store.StoredModel:
    """Store ``trained`` as a new version, logged in ``run`` (or in a training run of its own)."""
    if run is None:
        backend = backend or model_store.default_backend()
        with training_run(backend, f"train {name}", {"model_name": name}) as own:
            log_training(own, trained)
            return register(trained, name, version, run=own)
    version = version or model_store.next_version(name, run.backend)
    metadata = {
        "name": name,
        "version": version,
        "metrics": trained.metrics,
        "params": trained.params,
        "training_data_hash": trained.data_hash,
        "features": list(MODEL_FEATURES),
        "git_commit": git_commit(),
        "created_at": datetime.now(UTC).isoformat(),
    }
    profile = reference_profile(trained, name, version)
    calibration = Calibration.fit(onnx_positive_proba(trained.onnx_bytes, trained.x_holdout), trained.y_holdout)
    return model_store.save(name, version, trained.onnx_bytes, metadata,
                            {PROFILE_FILE: profile.to_bytes(), CALIBRATION_FILE: calibration.to_bytes()},
                            run=run, input_example=trained.x_holdout[:5])


def main(argv: list[str] | None = None) -> int:
    """Exit 2 for bad input (arguments, data, backend), found before the minute of training; 1 when a step fails."""
    parser = OneLineParser(prog="mlops-train", description="Train, export to ONNX and store the model.")
    parser.add_argument("--data-dir", type=Path, default=Path("feature_repo/data"))
    parser.add_argument("--name", default=None, help="model name (default: MLOPS_MODEL_NAME)")
    parser.add_argument("--version", default=None, help="version to store (default: next vN)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load()
    except ValidationError as exc:
        print(f"mlops-train: bad setting: {settings_error(exc)}", file=sys.stderr)
        return 2
    name = args.name or settings.model_name
    try:
        model_store.check_name(name)
        if args.version is not None:
            model_store.check_version(args.version)
    except model_store.ModelStoreError as exc:
        print(f"mlops-train: {exc}", file=sys.stderr)
        return 2
    try:
        dataset = datamod.read(args.data_dir)
    except FileNotFoundError as exc:
        print(f"mlops-train: no data at {args.data_dir} ({exc.filename}); run mlops-data first", file=sys.stderr)
        return 2
    except datamod.DataError as exc:
        print(f"mlops-train: {exc}", file=sys.stderr)
        return 2
    try:
        with fail_fast():
            backend = open_backend(None, settings, create=True)
            if args.version is not None and model_store.exists(name, args.version, backend):
                raise model_store.ModelStoreError(f"model {name}:{args.version} already exists; versions are "
                                                  "immutable")
            trained = train(dataset)
            stored = register(trained, name, args.version, backend=backend)
    except BackendUnavailable as exc:
        print(f"mlops-train: {exc}", file=sys.stderr)
        return 2
    except (ParityError, model_store.ModelStoreError, TrackingError) as exc:
        print(f"mlops-train: {exc}", file=sys.stderr)
        return 1
    except MlflowException as exc:
        print(f"mlops-train: MLflow: {exc.message.strip().splitlines()[0]}", file=sys.stderr)
        return 1
    m = trained.metrics
    print(f"stored {stored.tag}: auc={m['auc']:.4f} accuracy={m['accuracy']:.4f} "
          f"onnx_parity={m['onnx_parity_max_abs_diff']:.2e} mlflow_run={stored.metadata.get('mlflow_run_id')} "
          f"model_version={stored.metadata.get('mlflow_model_version')} path={stored.onnx_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
