"""Which CSV columns are not features: identifiers and timestamps, which `drift` skips unless asked.

An id or an event time differs between any two exports by construction (new customers, later times), so
comparing it always reports drift and buries the real findings. Each rule gives the reason `drift` prints:

- *identifier-like name*: ``id``, ``*_id``/``*-id``/``* id``, camelCase ``*Id``/``*ID``, ``uuid``/``guid``
  (alone or as a suffix), ``index``, and pandas' unnamed index columns (``Unnamed: 0``);
- *unique per row*: a non-numeric column whose reference values are all different (at least 20 rows);
- *timestamp-like name*: ``timestamp``, ``ts``, ``date``, ``datetime``, ``event_time``, or a name ending in
  ``_at``, ``_ts``, ``_date``, ``_datetime``, ``_timestamp`` (camelCase ``createdAt`` too). Names ending in
  ``_time`` are left alone: they are as often durations (``response_time``);
- *datetime values*: a non-numeric column whose values are all ISO 8601 dates or times.
"""

from __future__ import annotations

import re
import warnings

import pandas as pd

ID_NAME = re.compile(r"(?i:(^|[_\-\s.])(id|uuid|guid)$|^(index|uuid|guid)$|^unnamed: \d+$)|[a-z0-9](Id|ID|Uuid|UUID)$")
TIME_NAME = re.compile(r"(?i:^(timestamp|ts|date|datetime|event_time)$|[_\-\s.](at|ts|date|datetime|timestamp)$)"
                       r"|[a-z0-9](At|Ts|Date|Datetime|DateTime|Timestamp)$")
UNIQUE_MIN_ROWS = 20
SAMPLE = 500  # values looked at to decide whether a column holds dates


def skip_reason(name: str, reference: pd.Series) -> str | None:
    """Why this column is not a feature to compare, or None when it is one."""
    if ID_NAME.search(name):
        return "identifier-like name"
    if TIME_NAME.search(name):
        return "timestamp-like name"
    if pd.api.types.is_numeric_dtype(reference) or pd.api.types.is_bool_dtype(reference):
        return None
    values = reference.dropna()
    if len(values) and _all_datetimes(values.iloc[:SAMPLE].astype(str)):
        return "datetime values"
    if len(values) >= UNIQUE_MIN_ROWS and values.is_unique:
        return "unique per row"
    return None


def _all_datetimes(values: pd.Series) -> bool:
    # ISO 8601 only: free-form parsing would read month names ("March") or "Q1" of a categorical as dates.
    if not values.str.match(r"^\d{4}-\d{2}-\d{2}").all():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(values, errors="coerce", format="ISO8601", utc=True)
    return bool(parsed.notna().all())
