"""Feast definitions: the `customer` entity and the `customer_stats` feature view served online."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING,
                  description="A customer placing transactions")

customer_stats_source = FileSource(
    name="customer_stats_source",
    path="data/customer_stats.parquet",
    timestamp_field="event_timestamp",
)

customer_stats = FeatureView(
    name="customer_stats",
    entities=[customer],
    ttl=timedelta(days=1),
    schema=[
        Field(name="total_purchases", dtype=Int64),
        Field(name="avg_order_value", dtype=Float64),
        Field(name="days_since_last_order", dtype=Float64),
        Field(name="lifetime_value", dtype=Float64),
    ],
    online=True,
    source=customer_stats_source,
    tags={"team": "fraud"},
)
