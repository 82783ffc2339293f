"""The model's feature contract, shared by data generation, training, Feast, serving and drift."""

from __future__ import annotations

ENTITY = "customer_id"
FEATURE_VIEW = "customer_stats"
# Features kept per customer in the online store (Feast feature view `customer_stats`).
STORE_FEATURES: tuple[str, ...] = (
    "total_purchases",
    "avg_order_value",
    "days_since_last_order",
    "lifetime_value",
)
# Features that only exist at request time and come with each prediction request.
REQUEST_FEATURES: tuple[str, ...] = ("transaction_amount",)
# Column order of the model's input matrix.
MODEL_FEATURES: tuple[str, ...] = STORE_FEATURES + REQUEST_FEATURES
LABEL = "is_fraud"
TIMESTAMP = "event_timestamp"

# What a request may carry (the API's 400s; batch scoring's rejects): the model computes in float32, so larger
# values would become infinity. Python's `$` also matches before a final newline ("C1\n" would pass);
# `(?!\n)$` is the end of the string in Python and in the ECMA-262 dialect of the OpenAPI document alike.
FLOAT32_MAX = 3.4028234663852886e38
AMOUNT_MAX = 1e9
ID_PATTERN = r"^[A-Za-z0-9_.:-]+(?!\n)$"
ENTITY_ID_MAX_LENGTH = 64
