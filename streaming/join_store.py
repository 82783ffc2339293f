"""The outcome join's state in Redis: pending predictions and outcomes by request id, and the joined pairs
counted per model version and time slot — written in one Lua script per poll, with the offsets.

Why Redis: the join's state must outlive any consumer (a ``kill -9``, a rebalance) and be shared by the
whole group (a prediction and its outcome arrive on different partitions, read by different consumers), and
the horizon (default 7 days) bounds it by time, which Redis key TTLs do for free. Measured sizes are in the
docs/quality.md. A Redis that loses its data loses the pending join state with it: run it
with persistence (AOF), as for the online store.

Keys under ``mlops:join:<group>``:

- ``x:<request_id>``, expiring at the horizon: ``P`` + the prediction (msgpack ``[version, score, time]``)
  while it waits for its outcome, ``O`` + the outcome (``[label, time, value]``) while it waits for its
  prediction, ``M`` once joined (so a repeat of either is recognised and never counted twice);
- ``q:<model version>:<slot>`` (hash), by the prediction's time slot: the joined pairs' counts and sums
  (:mod:`streaming.quality` turns them into metrics), ``predictions`` (first sightings, for the label
  coverage), and the expected confusion matrix and score histograms of every prediction from its calibrated
  probability (``e…`` fields: the estimate before labels); expires ``horizon + window`` after the slot;
- ``owner:<topic>:<partition>`` (``<epoch>:<token>``) and ``offset:<topic>:<partition>``: as the drift
  store's, a save from a consumer that lost the partition is refused (fencing), and the offset moves in the
  same script as the state it reflects. Every message carries its offset and the script skips those below
  the stored one, so a save retried after a lost reply (the script ran, the answer did not come back) applies
  nothing twice.
- ``counts`` (hash): totals since the start (duplicates, expired, joined) for the metrics.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import msgspec
import redis

from streaming.alert_state import AlertStates
from streaming.runtime import Part, SaveResult

# KEYS[1] prefix (keys are built in the script: the join touches request ids nobody can list up front).
# ARGV[1]: msgpack {parts = [[topic, partition, owner, reseed], ...], items = [[[offset, kind, ...], ...] per part],
#                   horizon_ms, slot_s, keep_s, threshold, bins...}
# Returns {fenced part indexes, lost part indexes, joined, duplicates}.
SAVE_SCRIPT = """
local prefix = KEYS[1]
local a = cmsgpack.unpack(ARGV[1])
local horizon, slot_s, keep_s, threshold = a.horizon_ms, a.slot_s, a.keep_s, a.threshold
local nbins, lo, hi = a.nbins, a.logit_lo, a.logit_hi
local fenced, lost, ok, from = {}, {}, {}, {}
for i, p in ipairs(a.parts) do
  local okey = prefix .. ':owner:' .. p[1] .. ':' .. p[2]
  local current = redis.call('GET', okey)
  if not current and p[4] == 1 then
    redis.call('SET', okey, p[3])
    current = p[3]
  end
  if not current then
    table.insert(lost, i - 1)
  elseif current ~= p[3] then
    table.insert(fenced, i - 1)
  else
    ok[i] = true
    from[i] = tonumber(redis.call('GET', prefix .. ':offset:' .. p[1] .. ':' .. p[2]) or '-1')
  end
end
local acc = {}
local function add(key, field, n)
  local h = acc[key]
  if not h then h = {}; acc[key] = h end
  h[field] = (h[field] or 0) + n
end
local function slot_key(version, ts)
  return prefix .. ':q:' .. version .. ':' .. math.floor(ts / slot_s)
end
local function logit_bin(score)
  local s = math.min(math.max(score, 1e-12), 1 - 1e-12)
  local b = math.floor((math.log(s / (1 - s)) - lo) / (hi - lo) * nbins)
  return math.min(math.max(b, 0), nbins - 1)
end
local function estimate(pred, pcal)
  if not pcal then return end
  local key = slot_key(pred[1], pred[3])
  add(key, 'e_n', 1)
  if pred[2] >= threshold then
    add(key, 'e_tp', pcal)
    add(key, 'e_fp', 1 - pcal)
  else
    add(key, 'e_fn', pcal)
    add(key, 'e_tn', 1 - pcal)
  end
  local b = logit_bin(pred[2])
  add(key, 'e1:' .. b, pcal)
  add(key, 'e0:' .. b, 1 - pcal)
end
local counts = {}
local function count(field) counts[field] = (counts[field] or 0) + 1 end
local function joined(pred, out)
  local version, score, pts = pred[1], pred[2], pred[3]
  local label, ots, value = out[1], out[2], out[3]
  local key = slot_key(version, pts)
  local yhat = (score >= threshold) and 1 or 0
  local cell = (yhat == 1 and (label == 1 and 'tp' or 'fp')) or (label == 1 and 'fn' or 'tn')
  add(key, 'n', 1)
  add(key, cell, 1)
  add(key, 'score_sum', score)
  add(key, 'brier_sum', (score - label) * (score - label))
  add(key, 'h' .. label .. ':' .. logit_bin(score), 1)
  local c = math.min(math.floor(score * 10), 9)
  add(key, 'c' .. c .. ':n', 1)
  add(key, 'c' .. c .. ':s', score)
  add(key, 'c' .. c .. ':y', label)
  local delay = math.max(ots - pts, 0)
  add(key, 'd:' .. math.floor(math.log(delay + 1) / math.log(2)), 1)
  if value then add(key, 'value_' .. cell, value) end
  count('joined')
end
for i, its in ipairs(a.items) do
  if ok[i] then
    for _, it in ipairs(its) do
      if it[1] >= from[i] then
        local xkey = prefix .. ':x:' .. it[3]
        local kind = it[2]
        local mine = {it[4], it[5], it[6]}
        -- One call places this side if the request id is new, or returns what is there (Redis >= 7.0).
        local held = redis.call('SET', xkey, kind .. cmsgpack.pack(mine), 'NX', 'PX', horizon, 'GET')
        if kind == 'P' then
          if not held then
            add(slot_key(mine[1], mine[3]), 'predictions', 1)
            estimate(mine, it[7])
          elseif string.sub(held, 1, 1) == 'O' then
            add(slot_key(mine[1], mine[3]), 'predictions', 1)
            estimate(mine, it[7])
            joined(mine, cmsgpack.unpack(string.sub(held, 2)))
            redis.call('SET', xkey, 'M', 'PX', horizon)
          else
            count('duplicate_predictions')
          end
        else
          if not held then
            count('outcomes_waiting')
          elseif string.sub(held, 1, 1) == 'P' then
            joined(cmsgpack.unpack(string.sub(held, 2)), mine)
            redis.call('SET', xkey, 'M', 'PX', horizon)
          else
            count('duplicate_outcomes')
          end
        end
      end
    end
  end
end
for key, h in pairs(acc) do
  for f, n in pairs(h) do
    if string.find(f, '_sum', 1, true) or string.find(f, ':s', 1, true) or string.find(f, 'value_', 1, true)
        or string.sub(f, 1, 1) == 'e' then
      redis.call('HINCRBYFLOAT', key, f, n)
    else
      redis.call('HINCRBY', key, f, n)
    end
  end
  redis.call('EXPIRE', key, keep_s)
  redis.call('SADD', prefix .. ':slots', key)
end
for f, n in pairs(counts) do redis.call('HINCRBY', prefix .. ':counts', f, n) end
for i, p in ipairs(a.parts) do
  if ok[i] and p[5] then
    redis.call('SET', prefix .. ':offset:' .. p[1] .. ':' .. p[2], p[5])
  end
end
return {fenced, lost, counts['joined'] or 0}
"""

# KEYS: owner key, offset key. ARGV: the claimer's token. Returns {epoch, offset or false}.
CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local epoch = (current and tonumber(string.match(current, '^%d+')) or 0) + 1
redis.call('SET', KEYS[1], epoch .. ':' .. ARGV[1])
return {epoch, redis.call('GET', KEYS[2])}
"""

_pack = msgspec.msgpack.Encoder()


@dataclass
class JoinSettings:
    horizon_s: float = 7 * 86400.0  # how long a prediction waits for its outcome (and an outcome for it)
    slot_s: int = 300  # time slots of the quality windows, by the prediction's time
    window_slots: int = 288  # the time window: 24 h of 5-minute slots
    threshold: float = 0.5  # the serving decision threshold: the confusion matrix is taken at it
    bins: int = 400  # score histogram bins per class (on the logit), for ROC AUC
    logit_lo: float = -10.0
    logit_hi: float = 10.0


@dataclass
class JoinCheckpoint:
    """A partition's offset and the items read from it since its last save (they are the state to write)."""

    offset: int | None
    dead_lettered: int = 0
    epoch: int = 0
    items: list[list] = field(default_factory=list)  # [offset, kind, request_id, ...]


class JoinStore:
    def __init__(self, client: redis.Redis, group: str, settings: JoinSettings) -> None:
        self.client = client
        self.settings = settings
        self.prefix = f"mlops:join:{group}"
        self.token = secrets.token_hex(8)
        self._save = client.register_script(SAVE_SCRIPT)
        self._claim = client.register_script(CLAIM_SCRIPT)
        self.alerts = AlertStates(client, self.prefix)  # keys (model, version, kind, metric)

    def _owner(self, part: Part) -> str:
        return f"{self.prefix}:owner:{part[0]}:{part[1]}"

    def claim(self, part: Part) -> JoinCheckpoint:
        epoch, offset = self._claim(keys=[self._owner(part), f"{self.prefix}:offset:{part[0]}:{part[1]}"],
                                    args=[self.token])
        return JoinCheckpoint(int(offset) if offset is not None else None, epoch=int(epoch))

    def save(self, todo: dict[Part, JoinCheckpoint], reseed: set[Part] | frozenset[Part] = frozenset()
             ) -> SaveResult:
        """Apply the partitions' read items and move their offsets, atomically; partitions taken over by another
        consumer (fenced) or whose owner key the store lost are left untouched and returned."""
        parts = list(todo)
        s = self.settings
        body = {
            "parts": [[p[0], p[1], f"{c.epoch}:{self.token}", int(p in reseed), c.offset] for p, c in todo.items()],
            "items": [todo[p].items for p in parts],  # per part, as read: no copy per item
            "horizon_ms": int(s.horizon_s * 1000), "slot_s": s.slot_s,
            "keep_s": int(s.horizon_s + s.slot_s * s.window_slots), "threshold": s.threshold,
            "nbins": s.bins, "logit_lo": s.logit_lo, "logit_hi": s.logit_hi,
        }
        fenced, lost, _ = self._save(keys=[self.prefix], args=[_pack.encode(body)])
        result = SaveResult([parts[int(i)] for i in fenced], [parts[int(i)] for i in lost])
        for p, c in todo.items():
            if p not in result.fenced and p not in result.lost:
                c.items.clear()
        return result

    def ping(self) -> None:
        self.client.ping()

    def counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(f"{self.prefix}:counts").items()}

    def slots(self, first_slot: int = 0) -> dict[tuple[str, int], dict[str, float]]:
        """The joined pairs' sums per (model version, slot) from ``first_slot`` on (slots expired from Redis are
        dropped from its index here)."""
        index = f"{self.prefix}:slots"
        wanted = []
        for raw in self.client.smembers(index):
            key = raw.decode()
            version, slot = key[len(self.prefix) + 3:].rsplit(":", 1)
            if int(slot) >= first_slot:
                wanted.append((key, version, int(slot)))
        with self.client.pipeline(transaction=False) as pipe:
            for key, _, _ in wanted:
                pipe.hgetall(key)
            hashes = pipe.execute()
        gone = [key for (key, _, _), h in zip(wanted, hashes, strict=True) if not h]
        if gone:
            self.client.srem(index, *gone)
        return {(version, slot): {f.decode(): float(v) for f, v in h.items()}
                for (_, version, slot), h in zip(wanted, hashes, strict=True) if h}
