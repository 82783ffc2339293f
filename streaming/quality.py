"""Realised quality from the joined pairs' sums (:mod:`streaming.join_store`): the metrics per model version.

Everything is a sum over pairs, so slots add up into any window and the numbers equal scikit-learn's on the
same rows: accuracy, precision, recall and F1 at the serving threshold, the Brier score (exact sums), the
expected calibration error over 10 equal-width score bins (numpy's formula on the same rows), and ROC AUC
from per-class score histograms (400 bins on the logit, -10 to 10). The histogram AUC counts the pairs of a
positive and a negative that fall in the same bin as ties (half a pair); the true AUC can differ from it only
through those pairs' order, so ``auc_error_bound`` = ½ · Σ_b pos_b · neg_b / (P · N) is an exact bound,
computed from the same histograms. The label delay percentiles come from log2 bins (reported as the upper edge
of the bin: within a factor 2).

:func:`estimated` is the same metrics before the labels, by confidence-based performance estimation (CBPE,
see :mod:`mlops.calibration`) over every prediction of the window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

CALIBRATION_BINS = 10


def merge(slots: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for sums in slots:
        for field, value in sums.items():
            total[field] += value
    return dict(total)


def realised(sums: Mapping[str, float], bins: int = 400) -> dict[str, float | int | None]:
    """The metrics of one window's sums; None where a metric is undefined (no pairs, or one class only)."""
    n = int(sums.get("n", 0))
    tp, fp, tn, fn = (int(sums.get(k, 0)) for k in ("tp", "fp", "tn", "fn"))
    predictions = int(sums.get("predictions", 0))
    out: dict[str, float | int | None] = {
        "predictions": predictions, "labelled": n,
        "label_coverage": n / predictions if predictions else None,
        "positives": tp + fn,
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "brier": sums.get("brier_sum", 0.0) / n if n else None,
    }
    p, r = out["precision"], out["recall"]
    out["f1"] = 2 * p * r / (p + r) if p is not None and r is not None and p + r else (0.0 if n else None)
    out["auc"], out["auc_error_bound"] = auc_from_histograms(sums, bins)
    out["ece"] = expected_calibration_error(sums)
    for q in (50, 90, 99):
        out[f"label_delay_p{q}_s"] = delay_percentile(sums, q / 100)
    for cell in ("tp", "fp", "fn"):
        if f"value_{cell}" in sums:
            out[f"value_{cell}"] = sums[f"value_{cell}"]
    return out


def estimated(sums: Mapping[str, float], bins: int = 400) -> dict[str, float | int | None]:
    """CBPE: the metrics the expected confusion matrix gives (each prediction counted as ``p`` of a positive and
    ``1 - p`` of a negative, ``p`` its calibrated probability), over every prediction, labelled or not."""
    n = sums.get("e_n", 0.0)
    tp, fp, tn, fn = (sums.get(k, 0.0) for k in ("e_tp", "e_fp", "e_tn", "e_fn"))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    out: dict[str, float | int | None] = {
        "predictions": int(n), "accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision and recall else None,
        "positive_rate": (tp + fn) / n if n else None,
    }
    out["auc"], _ = auc_from_histograms(sums, bins, "e")
    return out


def auc_from_histograms(sums: Mapping[str, float], bins: int, prefix: str = "h"
                        ) -> tuple[float | None, float | None]:
    """ROC AUC from per-class histograms ``<prefix>1:<bin>`` / ``<prefix>0:<bin>`` (counts, or expected counts)."""
    pos = np.array([sums.get(f"{prefix}1:{b}", 0.0) for b in range(bins)])
    neg = np.array([sums.get(f"{prefix}0:{b}", 0.0) for b in range(bins)])
    n_pos, n_neg = pos.sum(), neg.sum()
    if not n_pos or not n_neg:
        return None, None
    below = np.cumsum(neg) - neg  # negatives in lower bins
    auc = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
    bound = float(0.5 * (pos * neg).sum() / (n_pos * n_neg))
    return auc, bound


def expected_calibration_error(sums: Mapping[str, float]) -> float | None:
    n = sums.get("n", 0)
    if not n:
        return None
    ece = 0.0
    for c in range(CALIBRATION_BINS):
        count = sums.get(f"c{c}:n", 0)
        if count:
            ece += abs(sums.get(f"c{c}:s", 0.0) - sums.get(f"c{c}:y", 0.0)) / n
    return ece


def delay_percentile(sums: Mapping[str, float], q: float) -> float | None:
    counts = {int(k[2:]): v for k, v in sums.items() if k.startswith("d:")}
    total = sum(counts.values())
    if not total:
        return None
    seen = 0.0
    for b in sorted(counts):
        seen += counts[b]
        if seen >= q * total:
            return float(2 ** (b + 1) - 1)
    return None
