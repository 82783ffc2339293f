"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): the rules of the API that JSON Schema
cannot state, so that every generated body the schema calls valid is valid.

- A prediction batch's rows name distinct `request_id`s (each names one prediction event), and an outcomes
  request's rows with one `request_id` say the same; JSON Schema's `uniqueItems` compares whole rows, not one
  property of them. The OpenAPI document says so in the bodies' descriptions. (The coverage phase does not
  run these hooks; it repeats one row to reach `maxItems`, which both rules accept.)
- An outcome's `timestamp` lies between 1970 and five minutes from now (a date-time format cannot bound it);
  the field's description says so.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import schemathesis

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@schemathesis.hook
def filter_body(context, body) -> bool:
    if not isinstance(body, dict):
        return True
    rows = body.get("requests", body.get("outcomes"))
    if not isinstance(rows, list):
        return True
    rows = [row for row in rows if isinstance(row, dict)]
    if "outcomes" in body:  # one request_id, one outcome: repeats must be the same row
        seen: dict[str, str] = {}
        for row in rows:
            if seen.setdefault(str(row.get("request_id")), repr(sorted(row.items()))) != repr(sorted(row.items())):
                return False
        return all(_in_range(row.get("timestamp")) for row in rows)
    given = [row["request_id"] for row in rows if row.get("request_id") is not None]
    if len(given) != len(set(map(str, given))):
        return False
    return True


def _in_range(timestamp: object) -> bool:
    if not isinstance(timestamp, str):
        return True
    try:
        when = datetime.fromisoformat(timestamp)
    except ValueError:
        return True  # the server must say why, in a 400
    try:
        when = when.astimezone(UTC)
    except (OverflowError, ValueError):
        return False
    return EPOCH <= when <= datetime.now(UTC) + timedelta(minutes=4)
