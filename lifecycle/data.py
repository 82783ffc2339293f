"""Seeded synthetic fraud data: customer profiles for Feast and labelled transactions for training.

Feature values depend only on the seed; timestamps are laid out behind ``as_of`` so that Feast's
materialization window (ttl one day) always covers them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from mlops.schema import ENTITY, LABEL, STORE_FEATURES, TIMESTAMP

CUSTOMERS_FILE = "customer_stats.parquet"
TRANSACTIONS_FILE = "transactions.parquet"


@dataclass(frozen=True)
class Dataset:
    customers: pd.DataFrame
    transactions: pd.DataFrame


def customer_id(i: int) -> str:
    return f"C{i:06d}"


def generate(
    n_customers: int = 2_000, n_transactions: int = 40_000, seed: int = 42, as_of: datetime | None = None
) -> Dataset:
    rng = np.random.default_rng(seed)
    as_of = (as_of or datetime.now(UTC)).replace(microsecond=0)

    total_purchases = rng.poisson(rng.lognormal(2.5, 0.8, n_customers)).astype(np.int64)
    avg_order_value = np.round(rng.lognormal(4.0, 0.5, n_customers), 2)
    days_since_last_order = np.round(rng.exponential(20.0, n_customers), 1)
    lifetime_value = np.round(total_purchases * avg_order_value * rng.lognormal(0.0, 0.1, n_customers), 2)
    customers = pd.DataFrame(
        {
            ENTITY: [customer_id(i) for i in range(n_customers)],
            "total_purchases": total_purchases,
            "avg_order_value": avg_order_value,
            "days_since_last_order": days_since_last_order,
            "lifetime_value": lifetime_value,
            TIMESTAMP: [as_of - timedelta(seconds=int(s)) for s in rng.integers(60, 6 * 3600, n_customers)],
        }
    )

    who = rng.integers(0, n_customers, n_transactions)
    aov = avg_order_value[who]
    # Most transactions look like the customer's usual order; a minority are unusually large.
    ratio = rng.lognormal(0.0, 0.45, n_transactions) * np.where(rng.random(n_transactions) < 0.1, 4.0, 1.0)
    amount = np.round(aov * ratio, 2)
    logit = (
        -4.2
        + 2.6 * np.log(ratio)
        + 0.035 * days_since_last_order[who]
        - 0.6 * np.log1p(total_purchases[who])
        + 1.5
    )
    label = (rng.random(n_transactions) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    transactions = pd.DataFrame(
        {
            ENTITY: customers[ENTITY].to_numpy()[who],
            "transaction_amount": amount,
            LABEL: label,
            TIMESTAMP: [as_of - timedelta(seconds=int(s)) for s in rng.integers(0, 6 * 3600, n_transactions)],
        }
    )
    return Dataset(customers=customers, transactions=transactions)


def training_frame(data: Dataset) -> pd.DataFrame:
    """Transactions joined with their customer's stats (the stats are static within the data set)."""
    stats = data.customers[[ENTITY, *STORE_FEATURES]]
    return data.transactions.merge(stats, on=ENTITY, how="left", validate="many_to_one")


def write(data: Dataset, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"customers": out_dir / CUSTOMERS_FILE, "transactions": out_dir / TRANSACTIONS_FILE}
    data.customers.to_parquet(paths["customers"], index=False)
    data.transactions.to_parquet(paths["transactions"], index=False)
    return paths


def read(data_dir: Path) -> Dataset:
    return Dataset(
        customers=pd.read_parquet(data_dir / CUSTOMERS_FILE),
        transactions=pd.read_parquet(data_dir / TRANSACTIONS_FILE),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlops-data", description="Generate the synthetic fraud data set.")
    parser.add_argument("--out", type=Path, default=Path("feature_repo/data"))
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--transactions", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    paths = write(generate(args.customers, args.transactions, args.seed), args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
