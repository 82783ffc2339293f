"""One drift engine: the batch `drift` tool on two tables and the streaming consumer on the same rows as
prediction events give the same scores, to 1e-9 (the same profile bins, the same counting, the same
mlops.stattests scoring), for numeric features, the score, the predicted label and the multivariate column; and
the multivariate column catches a broken correlation that leaves every feature's own histogram in place."""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from mlops import events, stattests
from mlops.profile import LABEL, MULTIVARIATE, PREDICTION, ReferenceProfile, build_profile
from streaming import batch_drift
from streaming.absorb import Absorber
from streaming.state_store import PartitionCheckpoint
from streaming.window import SlotHistograms, WindowSpec, merged_windows

FEATURES = ("transaction_amount", "avg_order_value", "days_since_last_order")
ARGS = argparse.Namespace(threshold=0.2, ks_threshold=0.15, alpha=0.05)


def frame(rng: np.random.Generator, n: int, shift: float, correlated: bool = True) -> pd.DataFrame:
    """Three features, the first two correlated (0.9) unless ``correlated`` is off: the same marginals."""
    base = rng.normal(size=(n, 3))
    if correlated:
        base[:, 1] = 0.9 * base[:, 0] + np.sqrt(1 - 0.81) * base[:, 1]
    data = {name: np.exp(3 + shift * (i == 0) + 0.6 * base[:, i]) for i, name in enumerate(FEATURES)}
    data[PREDICTION] = rng.beta(0.6 + shift, 3.0, n)
    return pd.DataFrame(data)


def stream_scores(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, dict[str, float]]:
    """What the consumer would judge: the events through its absorber, the merged window, its scoring."""
    profile = ReferenceProfile.from_bytes(build_profile(  # as the consumer loads it from the model store
        "m", "v1", {f: reference[f].to_numpy() for f in FEATURES}, reference[PREDICTION].to_numpy()).to_bytes())
    now = time.time()
    raws = [events.encode(events.PredictionEvent(
        request_id=uuid.uuid4().hex, timestamp=datetime.fromtimestamp(now, UTC), model_name="m", model_version="v1",
        customer_id=None, features={f: float(row[f]) for f in FEATURES}, prediction=float(row[PREDICTION]),
        label=int(row[PREDICTION] >= 0.5))) for row in current.to_dict("records")]
    spec = WindowSpec(slot_seconds=60, window_seconds=3600)
    states = {p: PartitionCheckpoint(0, 0, 0, SlotHistograms()) for p in range(3)}
    assert Absorber(lambda name, version: profile, spec).absorb(raws, [i % 3 for i in range(len(raws))], states,
                                                                 now) == []
    windows = merged_windows([s.windows for s in states.values()], spec, now)
    return {column: stattests.score_column(profile.columns[column], window.counts)
            for (_, _, column), window in windows.items()}


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_batch_and_stream_give_the_same_scores(shift):
    rng = np.random.default_rng(7)
    reference, current = frame(rng, 5000, 0.0), frame(rng, 1500, shift)
    stream = stream_scores(reference, current)
    for table in (reference, current):  # the predicted label, as the batch tool reads a text column
        table[LABEL] = (table[PREDICTION] >= 0.5).astype(int).astype(str)
    columns = [*FEATURES, PREDICTION, LABEL]
    together = batch_drift.compare_multivariate(reference, current, columns, ARGS)
    assert together is not None
    batch = {r.column: r.scores for r in [*batch_drift.compare(reference, current, columns, ARGS), together]}
    assert set(batch) == set(stream) == {*FEATURES, PREDICTION, LABEL, MULTIVARIATE}
    for column, scores in stream.items():
        assert len(scores) >= 4, scores  # PSI, KS or chi-square, and the registry's automatic choice
        for name, value in scores.items():
            assert batch[column][name] == pytest.approx(value, abs=1e-9, rel=1e-9), (column, name)
    if shift:
        assert stream["transaction_amount"]["psi"] > 0.2 and stream["transaction_amount"]["wasserstein"] > 0.1


def test_a_broken_correlation_shows_only_in_the_multivariate_column():
    rng = np.random.default_rng(11)
    scores = stream_scores(frame(rng, 5000, 0.0), frame(rng, 2000, 0.0, correlated=False))
    assert all(scores[f]["psi"] < 0.1 and scores[f]["ks"] < 0.1 for f in FEATURES), scores  # marginals unchanged
    assert scores[MULTIVARIATE]["psi"] > 0.2 and scores[MULTIVARIATE]["ks"] > 0.15, scores[MULTIVARIATE]
