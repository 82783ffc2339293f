"""Seeded synthetic fraud data: a history of customer stats for Feast and labelled transactions for training.

``customer_stats`` is a feature table as a real one looks: several snapshots per customer over two days
(purchases, the usual order value and recency vary around the customer's own level). Each transaction's label depends on
the stats *as they were when it happened*, so a training set must be joined point-in-time
(:func:`training_frame` here, Feast's ``get_historical_features`` in the pipeline): joining the latest stats
would leak the future into the past. Values depend only on the seed; timestamps are laid out behind
``as_of`` so that Feast's materialization window always covers the latest snapshot.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from mlops import offline
from mlops.cli_args import OneLineParser, positive_int
from mlops.schema import ENTITY, LABEL, STORE_FEATURES, TIMESTAMP

CUSTOMERS_FILE = "customer_stats.parquet"
TRANSACTIONS_FILE = "transactions.parquet"
# The feature view's ttl (feature_repo/features.py): a snapshot older than this does not describe an event.
FEATURE_TTL = timedelta(days=1)
SNAPSHOTS = 4
SNAPSHOT_GAP = timedelta(hours=16)  # + up to 6 h jitter: always below FEATURE_TTL
JITTER_S = 6 * 3600


@dataclass(frozen=True)
class Dataset:
    customers: pd.DataFrame  # the customer_stats history: several rows (snapshots) per customer
    transactions: pd.DataFrame

    def latest_customers(self) -> pd.DataFrame:
        """The newest snapshot per customer: what materialization puts in the online store."""
        ordered = self.customers.sort_values(TIMESTAMP, kind="stable")
        return ordered.groupby(ENTITY, sort=False).tail(1).sort_values(ENTITY).reset_index(drop=True)


def customer_id(i: int) -> str:
    return f"C{i:06d}"


def generate(
    n_customers: int = 2_000, n_transactions: int = 40_000, seed: int = 42, as_of: datetime | None = None,
    snapshots: int = SNAPSHOTS,
) -> Dataset:
    rng = np.random.default_rng(seed)
    as_of = (as_of or datetime.now(UTC)).replace(microsecond=0)
    ids = np.array([customer_id(i) for i in range(n_customers)])

    # Snapshot k of every customer (k = snapshots - 1 is the latest, a few hours before as_of). Each snapshot
    # varies around the customer's own level, and the population is the same at every snapshot (stationary):
    # the latest snapshots, which serving reads, look like the history training saw, so no drift is raised
    # by the data set itself; yet any one transaction's stats are those of its time.
    purchase_rate = rng.lognormal(2.5, 0.8, n_customers)
    base_aov = rng.lognormal(4.0, 0.5, n_customers)
    frames = []
    for k in range(snapshots):
        purchases = rng.poisson(purchase_rate).astype(np.int64)
        aov = np.round(base_aov * rng.lognormal(0.0, 0.25, n_customers), 2)
        age = SNAPSHOT_GAP * (snapshots - 1 - k)
        frames.append(pd.DataFrame({
            ENTITY: ids,
            "total_purchases": purchases.astype(np.int64),
            "avg_order_value": aov,
            "days_since_last_order": np.round(rng.exponential(20.0, n_customers), 1),
            "lifetime_value": np.round(purchases * aov * rng.lognormal(0.0, 0.1, n_customers), 2),
            TIMESTAMP: [as_of - age - timedelta(seconds=int(s)) for s in rng.integers(60, JITTER_S, n_customers)],
        }))
    customers = pd.concat(frames, ignore_index=True)

    # Transactions happen after each customer's first snapshot, over the last (snapshots - 1) gaps.
    span_s = int((SNAPSHOT_GAP * (snapshots - 1)).total_seconds())
    who = rng.integers(0, n_customers, n_transactions)
    # Distinct seconds: Feast's offline join keeps one row per (entity, event time), as an event log would.
    offsets = rng.choice(span_s, n_transactions, replace=n_transactions > span_s)
    transactions = pd.DataFrame({
        ENTITY: ids[who],
        TIMESTAMP: [as_of - timedelta(seconds=int(s)) for s in offsets],
    })
    stats = point_in_time(transactions, customers)
    # Most transactions look like the customer's usual order (at that time); a minority are unusually large.
    ratio = rng.lognormal(0.0, 0.45, n_transactions) * np.where(rng.random(n_transactions) < 0.1, 4.0, 1.0)
    transactions["transaction_amount"] = np.round(stats["avg_order_value"].to_numpy() * ratio, 2)
    logit = (
        -2.7
        + 3.2 * np.log(ratio)
        + 0.035 * stats["days_since_last_order"].to_numpy()
        - 0.6 * np.log1p(stats["total_purchases"].to_numpy())
    )
    transactions[LABEL] = (rng.random(n_transactions) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    transactions = transactions[[ENTITY, "transaction_amount", LABEL, TIMESTAMP]]
    return Dataset(customers=customers, transactions=transactions)


def label_delays(n: int, seed: int = 0, never: float = 0.05, median_s: float = 3 * 3600.0,
                 spread: float = 1.6) -> np.ndarray:
    """When each transaction's true label becomes known, in seconds after it (NaN: never), as chargebacks
    arrive: most within hours (log-normal, median 3 h), a long tail to days (~1 % after 5 days), some never."""
    rng = np.random.default_rng(seed)
    delays = median_s * rng.lognormal(0.0, spread, n)
    delays[rng.random(n) < never] = np.nan
    return delays


def point_in_time(events: pd.DataFrame, history: pd.DataFrame, ttl: timedelta = FEATURE_TTL) -> pd.DataFrame:
    """Feast's point-in-time join, in pandas (:func:`mlops.offline.point_in_time`) with the feature view's ttl."""
    return offline.point_in_time(events, history, ttl)


def training_frame(data: Dataset) -> pd.DataFrame:
    """Transactions with their customer's stats as of each transaction (point-in-time, never later)."""
    stats = point_in_time(data.transactions, data.customers)
    frame = pd.concat([data.transactions, stats], axis=1)
    return frame.dropna(subset=list(STORE_FEATURES)).reset_index(drop=True)


class DataError(ValueError):
    """A data folder's files cannot be read as this data set (not parquet, or lacking columns)."""


REQUIRED_COLUMNS = {CUSTOMERS_FILE: [ENTITY, *STORE_FEATURES, TIMESTAMP],
                    TRANSACTIONS_FILE: [ENTITY, "transaction_amount", LABEL, TIMESTAMP]}


def write(data: Dataset, out_dir: Path) -> dict[str, Path]:
    """Both files, or neither: each is written beside its target and renamed over it only when both were written,
    so a failed write (disk full, no permission) leaves the previous data set whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"customers": out_dir / CUSTOMERS_FILE, "transactions": out_dir / TRANSACTIONS_FILE}
    partial = {kind: path.with_name(f".{path.name}.{os.getpid()}.partial") for kind, path in paths.items()}
    try:
        data.customers.to_parquet(partial["customers"], index=False)
        data.transactions.to_parquet(partial["transactions"], index=False)
        for kind, path in paths.items():
            os.replace(partial[kind], path)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return paths


def read(data_dir: Path) -> Dataset:
    """Raises FileNotFoundError for a missing file (generate the data first), :class:`DataError` for one that is
    not this data set."""
    frames = {}
    for name, columns in REQUIRED_COLUMNS.items():
        path = data_dir / name
        try:
            frames[name] = pd.read_parquet(path)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read {path} as parquet: {first[:200]}") from None
        missing = [c for c in columns if c not in frames[name].columns]
        if missing:
            raise DataError(f"cannot read {path} as this data set: it lacks the columns {missing}")
    return Dataset(customers=frames[CUSTOMERS_FILE], transactions=frames[TRANSACTIONS_FILE])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlops-data", description="Generate the synthetic fraud data set.")
    parser.add_argument("--out", type=Path, default=Path("feature_repo/data"))
    parser.add_argument("--customers", type=positive_int, default=2_000)
    parser.add_argument("--transactions", type=positive_int, default=40_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: {args.seed} is below 0")
    try:
        paths = write(generate(args.customers, args.transactions, args.seed), args.out)
    except OSError as exc:
        where = exc.filename or args.out
        print(f"mlops-data: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
