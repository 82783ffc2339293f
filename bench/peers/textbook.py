"""The FastAPI app as a tutorial writes it: pydantic models, the Feast SDK, onnxruntime, kafka-python.

    uvicorn bench.peers.textbook:app --workers N
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from kafka import KafkaProducer
from pydantic import BaseModel, Field

from lifecycle import model_store
from mlops.schema import ENTITY, FEATURE_VIEW, MODEL_FEATURES, STORE_FEATURES
from mlops.settings import Settings
from service.online_store import open_feature_store

settings = Settings.load()
store = open_feature_store(settings)
model = model_store.load(settings.model_name, settings.model_version)
session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
app = FastAPI()


class PredictRequest(BaseModel):
    customer_id: str
    transaction_amount: float = Field(ge=0)
    request_id: str | None = None


class Prediction(BaseModel):
    request_id: str
    customer_id: str | None
    prediction: float
    label: int
    model_name: str
    model_version: str
    latency_ms: float


@app.post("/predict", response_model=Prediction)
def predict(request: PredictRequest) -> Prediction:
    started = datetime.now(UTC)
    row = store.get_online_features(features=[f"{FEATURE_VIEW}:{f}" for f in STORE_FEATURES],
                                    entity_rows=[{ENTITY: request.customer_id}]).to_dict()
    if any(row[f][0] is None for f in STORE_FEATURES):
        raise HTTPException(404, f"unknown customer_id {request.customer_id!r}")
    features = {f: float(row[f][0]) for f in STORE_FEATURES} | {"transaction_amount": request.transaction_amount}
    x = np.array([[features[f] for f in MODEL_FEATURES]], dtype=np.float32)
    probability = float(session.run(None, {"features": x})[1][0][1])
    latency_ms = (datetime.now(UTC) - started).total_seconds() * 1000
    prediction = Prediction(request_id=request.request_id or uuid.uuid4().hex, customer_id=request.customer_id,
                            prediction=probability, label=int(probability >= settings.decision_threshold),
                            model_name=model.name, model_version=model.version, latency_ms=latency_ms)
    event = {**prediction.model_dump(), "timestamp": started.isoformat(), "features": features}
    producer.send(settings.predictions_topic, key=request.customer_id.encode(), value=json.dumps(event).encode())
    return prediction
