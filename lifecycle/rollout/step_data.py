"""What one rollout step did, read back from the prediction log (and the outcomes topic) since the step began.

No state of its own to lose: the step's start time is in the registry and the events are in Kafka, so a
controller that restarts reads the step again from ``offsets_for_times(step start)`` and reaches the same
numbers. Scores and model times are kept as uniform samples (reservoirs) of a few thousand per arm, customers
as sets, outcomes joined in memory to the step's predictions by ``request_id`` (bounded).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np
from confluent_kafka import Consumer, TopicPartition

from lifecycle.rollout.analysis import Arm, StepData
from mlops import events, outcomes
from mlops.rollout import RolloutState, step_key

log = logging.getLogger(__name__)
KEEP = 5000  # values kept per arm (scores, model times, shadow pairs)
MAX_PENDING = 500_000  # predictions of the step waiting for an outcome


class Reservoir:
    """A uniform sample of at most ``size`` items of a stream (Algorithm R)."""

    def __init__(self, size: int = KEEP, seed: int = 0) -> None:
        self.size, self.seen, self.items = size, 0, []  # type: ignore[var-annotated]
        self._rng = random.Random(seed)

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.items[j] = item

    def array(self) -> np.ndarray:
        return np.asarray(self.items, dtype=np.float64)


class ArmReader:
    def __init__(self, version: str) -> None:
        self.version = version
        self.predictions = self.requests = self.errors = 0
        self.customers: set[str] = set()
        self.scores, self.model_ms = Reservoir(seed=1), Reservoir(seed=2)
        self.labelled = self.correct = self.caught = 0

    def arm(self) -> Arm:
        return Arm(self.version, self.predictions, len(self.customers), self.scores.array(), self.model_ms.array(),
                   requests=self.requests, errors=self.errors, labelled=self.labelled, correct=self.correct)


class StepReader:
    """Reads ``predictions`` (and ``outcomes``) from ``since_ms`` (up to ``until_ms`` if given) for one step."""

    def __init__(self, kafka: Mapping[str, Any], state: RolloutState, predictions_topic: str, outcomes_topic: str,
                 since_ms: int, until_ms: int | None = None, threshold: float = 0.5, step_index: int | None = None
                 ) -> None:
        """``step_index``: the step whose predictions count (default: the state's; the 100 % step reads
        Production's arm of the step before)."""
        self.state, self.since_ms, self.until_ms, self.threshold = state, since_ms, until_ms, threshold
        self.step = step_key(state.id, state.step_index if step_index is None else step_index)
        self.candidate, self.baseline = ArmReader(state.candidate), ArmReader(state.baseline)
        self.pairs = Reservoir(seed=3)  # shadow: (candidate score, production score) on the same row
        self.pending: dict[str, tuple[ArmReader, int]] = {}
        self.early: dict[str, int] = {}  # outcomes read before their prediction
        self.consumer = Consumer({**kafka, "group.id": f"rollout-reader-{state.id}", "enable.auto.commit": False,
                                  "enable.partition.eof": False})
        self.topics = (predictions_topic, outcomes_topic)
        self.read_to: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self.consumer.assign(self._start_offsets())

    def _start_offsets(self) -> list[TopicPartition]:
        wanted = []
        for topic in self.topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                continue  # no outcomes topic yet: nothing to join
            wanted += [TopicPartition(topic, p, self.since_ms) for p in meta.partitions]
        found = self.consumer.offsets_for_times(wanted, timeout=10) if wanted else []
        for tp in found:  # nothing since the start time: from the partition's end as it is now, by number
            if tp.offset < 0:
                tp.offset = self.consumer.get_watermark_offsets(tp, timeout=10)[1]
            self.read_to[(tp.topic, tp.partition)] = tp.offset
        return found

    def close(self) -> None:
        self.consumer.close()

    def poll(self, max_messages: int = 100_000, timeout: float = 0.5) -> int:
        """Read what is there now, up to ``max_messages`` (a long backlog is caught up over several looks; a
        look judges the step's prefix read so far, which the anytime-valid tests allow); returns how many."""
        read = 0
        while read < max_messages:
            batch = self.consumer.consume(1000, timeout if read == 0 else 0)
            if not batch:
                break
            for message in batch:
                if message.error() is not None:
                    continue
                read += 1
                self.read_to[(message.topic(), message.partition())] = message.offset() + 1
                stamp = message.timestamp()[1]
                if stamp < self.since_ms or (self.until_ms is not None and stamp >= self.until_ms):
                    continue
                try:
                    if message.topic() == self.topics[0]:
                        self._prediction(events.decode(message.value()))
                    else:
                        self._outcome(outcomes.decode(message.value()))
                except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
                    continue  # the drift consumer dead-letters these; the rollout only skips them
            if len(batch) < 1000:  # caught up with the end of the log
                break
        return read

    def _prediction(self, event: events.PredictionEvent) -> None:
        if event.model_name != self.state.model or event.rollout != self.step:
            return  # another model, or served under another step's routing (a replica not there yet)
        if event.failed_version is not None and event.failed_version == self.state.candidate:
            self.candidate.requests += 1
            self.candidate.errors += 1
            if not self.state.shadow:  # the row was the candidate's; Production only stood in for it
                if event.customer_id is not None:
                    self.candidate.customers.add(event.customer_id)
                return
        if event.model_version == self.state.candidate:
            arm = self.candidate
        elif event.model_version == self.state.baseline:
            arm = self.baseline
        else:
            return
        self._count(arm, event.request_id, event.customer_id, event.prediction, event.model_ms)
        shadow = event.shadow
        if shadow is not None and shadow.model_version == self.state.candidate and arm is self.baseline:
            self._count(self.candidate, event.request_id, None, shadow.prediction, shadow.model_ms)
            self.pairs.add((shadow.prediction, event.prediction))

    def _count(self, arm: ArmReader, request_id: str, customer: str | None, score: float,
               model_ms: float | None) -> None:
        arm.predictions += 1
        arm.requests += 1
        if customer is not None:
            arm.customers.add(customer)
        arm.scores.add(score)
        if model_ms is not None:
            arm.model_ms.add(model_ms)
        label = int(score >= self.threshold)
        known = self.early.get(request_id)
        if known is not None:
            self._judge(arm, label, known)
            if not self.state.shadow or arm is self.candidate:  # in shadow both arms judge the same outcome
                del self.early[request_id]
        elif len(self.pending) < MAX_PENDING:
            key = request_id if arm is self.baseline or not self.state.shadow else request_id + "#shadow"
            self.pending[key] = (arm, label)

    def _outcome(self, event: outcomes.OutcomeEvent) -> None:
        found = False
        for key in (event.request_id, event.request_id + "#shadow"):
            entry = self.pending.pop(key, None)
            if entry is not None:
                self._judge(entry[0], entry[1], event.label)
                found = True
        if not found and len(self.early) < MAX_PENDING:
            self.early[event.request_id] = event.label

    @staticmethod
    def _judge(arm: ArmReader, predicted: int, actual: int) -> None:
        arm.labelled += 1
        arm.correct += int(predicted == actual)
        arm.caught += int(predicted == 1 and actual == 1)

    def catch_up(self, seconds: float = 30.0) -> None:
        """Read to the end of the log as it is now (a one-off read-out), at most ``seconds``. The end is fixed
        when called: live traffic arriving meanwhile does not keep the read-out reading."""
        deadline = time.monotonic() + seconds
        ends = {key: self.consumer.get_watermark_offsets(TopicPartition(*key), timeout=10)[1]
                for key in self.read_to}
        while time.monotonic() < deadline:
            if all(self.read_to[key] >= end for key, end in ends.items()):
                return
            if not self.poll(timeout=1.0):
                return  # behind only by offsets that hold no message (transaction markers)

    def data(self, elapsed_s: float, baseline: Arm | None = None) -> StepData:
        pairs = np.asarray(self.pairs.items, dtype=np.float64).reshape(-1, 2)
        return StepData(self.candidate.arm(), baseline or self.baseline.arm(), elapsed_s,
                        (pairs[:, 0], pairs[:, 1]) if self.state.shadow else None, self.threshold)
