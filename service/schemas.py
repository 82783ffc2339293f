"""Request and response shapes of the prediction API; validation here turns client mistakes into 400s."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlops.schema import STORE_FEATURES

# Strict: a JSON string or bool is not a number; NaN and infinity are refused.
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Amount = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1e9)]
EntityId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class PredictRequest(BaseModel):
    """One transaction to score: an entity id whose stats come from Feast, and/or the stats themselves."""

    model_config = ConfigDict(extra="forbid")

    customer_id: EntityId | None = None
    transaction_amount: Amount
    features: dict[str, FiniteNumber] | None = Field(
        None, description="store features given by the caller; they override the looked-up values"
    )
    request_id: RequestId | None = Field(None, description="caller's id for tracing; generated when absent")

    @model_validator(mode="after")
    def _entity_or_features(self) -> PredictRequest:
        given = set(self.features or {})
        unknown = given - set(STORE_FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {list(STORE_FEATURES)}")
        if self.customer_id is None and given != set(STORE_FEATURES):
            missing = sorted(set(STORE_FEATURES) - given)
            raise ValueError(f"give customer_id, or all store features (missing {missing})")
        for name, value in (self.features or {}).items():
            if value < 0:
                raise ValueError(f"feature {name} cannot be negative")
        return self


class Prediction(BaseModel):
    request_id: str
    customer_id: str | None
    prediction: float = Field(description="fraud probability")
    label: int = Field(description="1 when prediction >= threshold")
    model_name: str
    model_version: str
    latency_ms: float


class ScoreRow(BaseModel):
    """What the API server hands to the batched model service."""

    customer_id: str | None = None
    transaction_amount: float
    features: dict[str, float] | None = None


class ScoreResult(BaseModel):
    prediction: float | None = None
    features: dict[str, float] | None = None
    model_name: str
    model_version: str
    error: str | None = None
