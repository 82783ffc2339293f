"""The prediction API's contract: request and response shapes, the checks that turn client mistakes into
400s, the one error body every failure uses, and the OpenAPI document generated from the same types.

Typed with msgspec: decoding *is* validation (strict types — a JSON string or bool is not a number — and
unknown fields refused), done once, in C. What a JSON schema cannot say alone (a customer id or all four
store features) is checked here and stated in the OpenAPI document too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mlops.outcomes import OutcomeEvent
from mlops.schema import AMOUNT_MAX, ENTITY, ENTITY_ID_MAX_LENGTH, FLOAT32_MAX, ID_PATTERN, STORE_FEATURES

EntityId = Annotated[str, Meta(min_length=1, max_length=ENTITY_ID_MAX_LENGTH, pattern=ID_PATTERN)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
Amount = Annotated[float, Meta(ge=0, le=AMOUNT_MAX, description="transaction amount, 0 to 1e9")]
FeatureValue = Annotated[float, Meta(ge=0, le=FLOAT32_MAX)]


class StoreFeatures(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Store features given by the caller; they override the looked-up values."""

    total_purchases: FeatureValue | None = None
    avg_order_value: FeatureValue | None = None
    days_since_last_order: FeatureValue | None = None
    lifetime_value: FeatureValue | None = None

    def given(self) -> dict[str, float]:
        return {name: value for name in STORE_FEATURES if (value := getattr(self, name)) is not None}


class PredictRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One transaction to score: a customer id whose stats come from Feast, and/or all the stats themselves."""

    transaction_amount: Amount
    customer_id: EntityId | None = None
    features: StoreFeatures | None = None
    request_id: RequestId | None = None


class PredictBatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    requests: list[PredictRequest]


class Prediction(msgspec.Struct):
    request_id: str
    customer_id: str | None
    prediction: Annotated[float, Meta(description="fraud probability")]
    label: Annotated[int, Meta(description="1 when prediction >= the decision threshold")]
    model_name: str
    model_version: str
    latency_ms: float


class ErrorBody(msgspec.Struct):
    """Every error, whatever its status: a stable code and a one-line message."""

    error: Annotated[str, Meta(description="stable code, e.g. invalid_request, unknown_entity, overloaded")]
    detail: str


class RowError(msgspec.Struct):
    """A row of /predict_batch that could not be scored (the other rows still are)."""

    error: str
    detail: str
    customer_id: str | None = None


class RequestError(ValueError):
    """A client mistake: HTTP 400 / gRPC INVALID_ARGUMENT with this message."""


def check(request: PredictRequest) -> None:
    """The rules a JSON schema cannot express on its own."""
    if request.customer_id is None:
        given = request.features.given() if request.features is not None else {}
        if len(given) != len(STORE_FEATURES):
            missing = [name for name in STORE_FEATURES if name not in given]
            raise RequestError(f"give {ENTITY}, or all store features (missing {missing})")


_request_decoder = msgspec.json.Decoder(PredictRequest)
_batch_decoder = msgspec.json.Decoder(PredictBatchRequest)


def check_batch(requests: list[PredictRequest], max_rows: int) -> None:
    """Row count, each row's rules, and one row per request_id: the id names one prediction event."""
    if not 1 <= len(requests) <= max_rows:
        raise RequestError(f"requests: give 1 to {max_rows} rows, got {len(requests)}")
    first: dict[str, int] = {}
    for i, request in enumerate(requests):
        try:
            check(request)
        except RequestError as exc:
            raise RequestError(f"requests[{i}]: {exc}") from None
        if request.request_id is not None:
            j = first.setdefault(request.request_id, i)
            if j != i:
                raise RequestError(f"requests[{i}]: request_id {request.request_id!r} repeats requests[{j}]'s; "
                                   "each row is one prediction and needs an id of its own")


def decode_request(body: bytes) -> PredictRequest:
    try:
        request = _request_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestError(_message(exc)) from None
    check(request)
    return request


def decode_batch(body: bytes, max_rows: int) -> list[PredictRequest]:
    try:
        requests = _batch_decoder.decode(body).requests
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestError(_message(exc)) from None
    check_batch(requests, max_rows)
    return requests


# --- outcomes ------------------------------------------------------------------------------------------------

FUTURE_SLACK = timedelta(minutes=5)  # clocks disagree a little; an outcome known later than that is a mistake
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # event times are Unix times downstream (Kafka, the join's slots)
OutcomeValue = Annotated[float, Meta(ge=-1e15, le=1e15, description="optional, e.g. the amount at stake")]


class OutcomeIn(msgspec.Struct, forbid_unknown_fields=True):
    """The true label of one past prediction, named by the ``request_id`` its answer carried."""

    request_id: RequestId
    label: Annotated[Literal[0, 1], Meta(description="the true class: 1 fraud, 0 not")]
    timestamp: Annotated[datetime | None, Meta(
        description="when the outcome became known, ISO 8601 with a time zone, from 1970 to 5 minutes from now; "
                    "default: when received")] = None
    outcome_value: OutcomeValue | None = None


class OutcomesRequest(msgspec.Struct, forbid_unknown_fields=True):
    outcomes: list[msgspec.Raw]


class OutcomesAccepted(msgspec.Struct):
    accepted: int


class RowRefusal(msgspec.Struct):
    index: int
    detail: str


class OutcomesRefused(msgspec.Struct):
    """A 400 of /outcomes: nothing was accepted, and ``rows`` says what is wrong with each refused row."""

    error: str
    detail: str
    rows: list[RowRefusal]


class OutcomesInvalid(RequestError):
    def __init__(self, detail: str, rows: list[RowRefusal]) -> None:
        super().__init__(detail)
        self.rows = rows


_outcomes_decoder = msgspec.json.Decoder(OutcomesRequest)
_outcome_decoder = msgspec.json.Decoder(OutcomeIn)


def decode_outcomes(body: bytes, max_rows: int, now: datetime | None = None) -> list[OutcomeEvent]:
    """All rows or none: any bad row refuses the request, naming every bad row (``OutcomesInvalid``), so a
    client fixes and resends the whole request instead of guessing which rows were kept."""
    try:
        raws = _outcomes_decoder.decode(body).outcomes
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RequestError(_message(exc)) from None
    if not 1 <= len(raws) <= max_rows:
        raise RequestError(f"outcomes: give 1 to {max_rows} rows, got {len(raws)}")
    now = now or datetime.now(UTC)
    latest = now + FUTURE_SLACK
    events: list[OutcomeEvent] = []
    refused: list[RowRefusal] = []
    first: dict[str, tuple[int, OutcomeEvent]] = {}
    for i, raw in enumerate(raws):
        try:
            row = _outcome_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            refused.append(RowRefusal(i, _message(exc)))
            continue
        timestamp = row.timestamp or now
        if timestamp.tzinfo is None:
            refused.append(RowRefusal(i, "timestamp needs a time zone (e.g. 2026-12-03T10:15:00Z)"))
            continue
        if timestamp > latest:
            refused.append(RowRefusal(i, f"timestamp {timestamp.isoformat()} is in the future"))
            continue
        try:
            timestamp = timestamp.astimezone(UTC)
        except OverflowError:  # year 1 with a positive offset: before any representable UTC time
            timestamp = EPOCH - timedelta(days=1)
        if timestamp < EPOCH:
            refused.append(RowRefusal(i, f"timestamp {row.timestamp.isoformat()} is before 1970"))
            continue
        event = OutcomeEvent(request_id=row.request_id, label=row.label, timestamp=timestamp,
                             outcome_value=row.outcome_value)
        j, seen = first.setdefault(row.request_id, (i, event))
        if j != i and seen != event:  # the same outcome twice is harmless (the join counts it once)
            refused.append(RowRefusal(i, f"request_id {row.request_id!r} repeats outcomes[{j}]'s with another "
                                         "outcome"))
            continue
        events.append(event)
    if refused:
        raise OutcomesInvalid(f"{len(refused)} of {len(raws)} outcomes refused, none accepted: "
                              f"outcomes[{refused[0].index}]: {refused[0].detail}", refused)
    return events


def _message(exc: msgspec.DecodeError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):  # msgspec passes strings' bytes to Python's UTF-8 decoder
        return f"malformed JSON: a string is not valid UTF-8 ({exc.reason})"
    text = str(exc)
    if text.startswith("JSON is malformed: "):
        return "malformed JSON: " + text.removeprefix("JSON is malformed: ")
    if text.startswith("Input data was truncated"):
        return "malformed JSON: input data was truncated"
    return text


# --- OpenAPI ------------------------------------------------------------------------------------------------

ERRORS = {
    "400": "invalid request (wrong or missing field, bad JSON, too many rows); `detail` says what",
    "404": "unknown customer_id: the online store has no features for it (/predict only; a batch row says so)",
    "413": "body larger than the configured limit",
    "415": "content type is not application/json",
    "503": "retryable: overloaded, online store unreachable or empty, prediction log full",
}


def openapi(title: str, version: str, max_rows: int) -> dict[str, Any]:
    """OpenAPI 3.1 for /predict, /predict_batch and /outcomes, generated from the types above."""
    (request_ref, batch_ref, prediction_ref, error_ref, row_error_ref, outcome_ref, accepted_ref, refused_ref
     ), components = msgspec.json.schema_components(
        [PredictRequest, PredictBatchRequest, Prediction, ErrorBody, RowError, OutcomeIn, OutcomesAccepted,
         OutcomesRefused],
        ref_template="#/components/schemas/{name}",
    )
    request_schema = components["PredictRequest"]
    request_schema["anyOf"] = [  # null counts as absent: a present-but-null field does not satisfy a branch
        {"required": [ENTITY], "properties": {ENTITY: {"type": "string"}}},
        {"required": ["features"],
         "properties": {"features": {"type": "object", "required": list(STORE_FEATURES),
                                     "properties": {name: {"type": "number"} for name in STORE_FEATURES}}}},
    ]
    request_schema["description"] = (f"Give {ENTITY} (its stats come from the online store), or all store features "
                                      "in `features`, or both (given features override looked-up ones).")
    components["PredictBatchRequest"]["properties"]["requests"].update(minItems=1, maxItems=max_rows)
    components["PredictBatchRequest"]["description"] = (
        "Rows to score, each answered in order. A `request_id` names one prediction: no two rows may share one.")
    errors = {code: {"description": text, "content": {"application/json": {"schema": error_ref}}}
              for code, text in ERRORS.items()}

    def operation(summary: str, body_ref: dict, ok: dict, statuses: list[str], done: str = "scored") -> dict:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_ref}}},
            "responses": {"200": {"description": done, "content": {"application/json": {"schema": ok}}},
                          **{code: errors[code] for code in statuses}},
        }}

    components["OutcomeIn"]["properties"]["timestamp"]["anyOf"][0]["format"] = "date-time"
    outcomes_body = {"type": "object", "required": ["outcomes"], "additionalProperties": False,
                     "properties": {"outcomes": {"type": "array", "items": outcome_ref, "minItems": 1,
                                                 "maxItems": max_rows}},
                     "description": "True labels of past predictions, all accepted or none. A `request_id` names "
                                    "one prediction: two rows with one `request_id` must say the same."}
    outcomes = operation("Record the true labels of past predictions (to prediction-outcomes)", outcomes_body,
                         accepted_ref, ["413", "415", "503"], done="every row accepted")
    outcomes["post"]["responses"]["400"] = {
        "description": "nothing accepted: `rows` names every refused row (or, for a body that is not an outcomes "
                       "request at all, `detail` says why)",
        "content": {"application/json": {"schema": {"anyOf": [refused_ref, error_ref]}}}}

    batch_ok = {"type": "array", "items": {"anyOf": [prediction_ref, row_error_ref]},
                "description": "one entry per request row, in order"}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Fraud scoring: Feast online features + ONNX model, every prediction logged to Kafka."},
        "paths": {
            "/predict": operation("Score one transaction", request_ref, prediction_ref,
                                  ["400", "404", "413", "415", "503"]),
            "/predict_batch": operation("Score up to max_request_rows transactions", batch_ref, batch_ok,
                                        ["400", "413", "415", "503"]),
            "/outcomes": outcomes,
        },
        "components": {"schemas": components},
    }
