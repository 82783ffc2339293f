"""Decoding prediction events for the drift consumer; anything unusable is a poison message with a reason.

The wire format is :mod:`mlops.events` (JSON, typed with msgspec). The consumer decodes into its
:class:`~mlops.events.EventView` (the fields drift needs, the others skipped), one message at a time so a bad
one never costs its neighbours, and maps msgspec's errors to the dead-letter reason codes:

- ``bad_json``: not JSON, not an object, or an empty message;
- ``missing_field``: a required field is absent (or, later, a feature the model's profile needs);
- ``bad_field``: a field has the wrong type or value (strings for numbers, a label other than 0/1, a
  timestamp that is not RFC 3339, a number out of range);
- ``unsupported_schema_version``: written by a newer producer than this reader knows;
- ``unknown_model_version``: no reference profile for the model version it names (decided later).
"""

from __future__ import annotations

import msgspec

from mlops.events import SCHEMA_VERSION, EventView, decode_views


class PoisonEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def poison_from(error: Exception) -> PoisonEvent:
    """The dead-letter reason for a decoding error."""
    message = str(error)
    if isinstance(error, msgspec.ValidationError):
        if message.startswith("Object missing required field"):
            return PoisonEvent("missing_field", message)
        if message.startswith("Expected `object`") and " - at `" not in message:
            return PoisonEvent("bad_json", "not a JSON object")
        return PoisonEvent("bad_field", message)
    return PoisonEvent("bad_json", message)


def check_version(event: EventView) -> PoisonEvent | None:
    if not 1 <= event.schema_version <= SCHEMA_VERSION:
        return PoisonEvent("unsupported_schema_version",
                           f"schema_version {event.schema_version}; this reader knows 1..{SCHEMA_VERSION}")
    return None


def decode_batch(raws: list[bytes | None]) -> tuple[list[EventView], list[int], list[tuple[int, PoisonEvent]]]:
    """Events, their positions in ``raws``, and ``(position, poison)`` for the messages that are unusable."""
    events, positions, errors = decode_views(raws)
    poison = [(i, poison_from(exc)) for i, exc in errors]
    if any(e.schema_version != SCHEMA_VERSION for e in events):  # rare: keep the common path a single pass
        kept_events, kept_positions = [], []
        for event, i in zip(events, positions, strict=True):
            bad = check_version(event)
            if bad is None:
                kept_events.append(event)
                kept_positions.append(i)
            else:
                poison.append((i, bad))
        events, positions = kept_events, kept_positions
    return events, positions, poison


def parse(raw: bytes | None) -> EventView:
    """One event, or :class:`PoisonEvent` with the reason it is unusable."""
    events, _, poison = decode_batch([raw])
    if poison:
        raise poison[0][1]
    return events[0]
