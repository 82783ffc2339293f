"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): the rules of the API that JSON Schema
cannot state, so that every generated body the schema calls valid is valid.

- A batch's rows name distinct `request_id`s (each names one prediction event); JSON Schema's `uniqueItems`
  compares whole rows, not one property of them. The OpenAPI document says so in the batch's description.
"""

from __future__ import annotations

import schemathesis


@schemathesis.hook
def filter_body(context, body) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        return True
    ids = [row.get("request_id") for row in body["requests"] if isinstance(row, dict)]
    given = [i for i in ids if i is not None]
    return len(given) == len(set(map(str, given)))
