"""The outcome event: what really happened to a prediction, known later (a chargeback, a confirmed fraud).

Written to the `prediction-outcomes` topic by `POST /outcomes` (and the gRPC `Outcomes` call), or by any
producer that follows this format; read by the quality consumer, which joins it to the prediction with the
same ``request_id``. JSON, typed with msgspec like the prediction event; the message key is the
``request_id`` (UTF-8). Readers accept events without ``schema_version`` as version 1.

    {"schema_version": 1, "request_id": "…", "label": 1,
     "timestamp": "2026-12-03T10:15:00+00:00", "outcome_value": 1250.0}

``label`` is the true class (1: fraud); ``timestamp`` when the outcome became known (its event time: the
label delay is this minus the prediction's time); ``outcome_value`` optional, e.g. the amount at stake.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

SCHEMA_VERSION = 1


class OutcomeEvent(msgspec.Struct, kw_only=True, omit_defaults=False):
    request_id: str
    label: Literal[0, 1]
    timestamp: datetime
    outcome_value: float | None = None
    schema_version: int = SCHEMA_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(OutcomeEvent)


def encode(event: OutcomeEvent) -> bytes:
    return _encoder.encode(event)


def decode(raw: bytes) -> OutcomeEvent:
    """Raises ``msgspec.ValidationError`` (wrong field types, missing fields) or ``msgspec.DecodeError``."""
    return _decoder.decode(raw)
