"""Durable consumer state in Redis: per-partition checkpoints and the shared alert state.

A checkpoint holds a partition's window slots *and* the offset they reflect, written atomically (one Lua
script per poll for every touched partition), so a restarted or rebalanced consumer resumes exactly there:
nothing lost, nothing counted twice. Layout per partition, cheap to write every poll:

- hash ``<prefix>:p:<partition>``: field ``meta`` = msgpack ``[offset, consumed, dead_lettered]``, and one
  field ``s:<slot>`` per time slot (see :meth:`SlotHistograms.slot_blob`); a save writes only the slots
  that changed and deletes the ones that expired;
- hash ``<prefix>:ids:<partition>``: per time slot, field ``s:<slot>`` = the 64-bit hashes of the request ids
  counted in it (little-endian uint64, see :mod:`streaming.dedupe`), appended to by each save (only the ids
  added since the last one) and deleted with the slot, so a consumer that resumes the partition counts no
  event twice either; it is read only when a partition is claimed, never by the evaluations;
- ``<prefix>:owner:<partition>``: the owner, ``<epoch>:<token>``. Taking a partition over increments the
  epoch and writes the taker's token (one per store object, i.e. per consumer process), and a save from any
  other owner is refused, so a consumer that lost a partition without noticing (a zombie) can never
  overwrite its new owner's checkpoint. The token keeps that true across a flush, where epochs restart at 1.

A save finds the owner key in one of three states: its own (written), another consumer's (*fenced*: a real
takeover), or absent (*lost*: Redis was flushed or restarted empty, nobody has claimed the partition since).
Only the owner holds a lost partition's state, in memory, so it re-seeds the whole checkpoint and its owner
key in one script (``reseed``); a takeover is never mistaken for a loss, nor a loss for a takeover.

The alert state per (model, version, feature) is shared by all consumers of the group and changed with
a compare-and-set, so one state change makes one alert however many consumers see it; after a loss,
consumers put back the states they knew with set-if-absent (:mod:`streaming.alert_state`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

import msgspec
import redis

from streaming.alert_state import AlertStates
from streaming.window import SlotHistograms

# KEYS: owner key, checkpoint hash, legacy checkpoint, ids hash. ARGV: the claimer's token.
# Returns {epoch, hash, legacy, ids}.
CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local epoch = (current and tonumber(string.match(current, '^%d+')) or 0) + 1
redis.call('SET', KEYS[1], epoch .. ':' .. ARGV[1])
return {epoch, redis.call('HGETALL', KEYS[2]), redis.call('GET', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""

# KEYS: the partitions set, then (checkpoint hash, owner key, ids hash) per partition.
# ARGV per partition: partition, owner, reseed (0/1), n fields to set, n fields to delete, rewrite ids (0/1),
# n id fields to append to, field/value pairs, fields (deleted from both hashes), id field/value pairs.
# Returns {fenced partitions, lost partitions}; nothing is written for either.
SAVE_SCRIPT = """
local fenced, lost = {}, {}
local a = 1
for k = 1, (#KEYS - 1) / 3 do
  local hkey, okey, ikey = KEYS[3 * k - 1], KEYS[3 * k], KEYS[3 * k + 1]
  local part, owner, reseed = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local nset, ndel = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local rewrite, nids = ARGV[a + 5], tonumber(ARGV[a + 6])
  a = a + 7
  local current = redis.call('GET', okey)
  if not current and reseed == '1' then
    redis.call('DEL', hkey, ikey)
    redis.call('SET', okey, owner)
    current = owner
  end
  if not current then
    table.insert(lost, part)
  elseif current ~= owner then
    table.insert(fenced, part)
  else
    if nset > 0 then redis.call('HSET', hkey, unpack(ARGV, a, a + 2 * nset - 1)) end
    if ndel > 0 then
      redis.call('HDEL', hkey, unpack(ARGV, a + 2 * nset, a + 2 * nset + ndel - 1))
      redis.call('HDEL', ikey, unpack(ARGV, a + 2 * nset, a + 2 * nset + ndel - 1))
    end
    if rewrite == '1' then redis.call('DEL', ikey) end
    local b = a + 2 * nset + ndel
    for i = 0, nids - 1 do
      local f, v = ARGV[b + 2 * i], ARGV[b + 2 * i + 1]
      local old = redis.call('HGET', ikey, f)
      if old then v = old .. v end
      redis.call('HSET', ikey, f, v)
    end
    redis.call('SADD', KEYS[1], part)
  end
  a = a + 2 * nset + ndel + 2 * nids
end
return {fenced, lost}
"""

META = b"meta"
_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(tuple[int, int, int])


@dataclass
class PartitionCheckpoint:
    offset: int | None  # next offset to read (None: not known yet for a brand-new group)
    consumed: int  # events reflected in the windows (valid ones, duplicates of a request_id not counted)
    dead_lettered: int
    windows: SlotHistograms
    epoch: int = 0  # owner epoch this consumer holds (not stored with the checkpoint)

    def to_json(self) -> str:
        return json.dumps({"offset": self.offset, "consumed": self.consumed, "dead_lettered": self.dead_lettered,
                           "windows": self.windows.to_json()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PartitionCheckpoint:
        body = json.loads(raw)
        return cls(int(body["offset"]), int(body["consumed"]), int(body.get("dead_lettered", 0)),
                   SlotHistograms.from_json(body["windows"]))

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> PartitionCheckpoint | None:
        if META not in fields:
            return None
        offset, consumed, dead = _meta_decoder.decode(fields[META])
        blobs = {int(k[2:]): v for k, v in fields.items() if k.startswith(b"s:")}
        return cls(offset, consumed, dead, SlotHistograms.from_blobs(blobs))


def _slot_fields(fields: dict[bytes, bytes]) -> dict[int, bytes]:
    return {int(k[2:]): v for k, v in fields.items() if k.startswith(b"s:")}


@dataclass
class SaveResult:
    fenced: list[int] = field(default_factory=list)  # taken over by another consumer: nothing written
    lost: list[int] = field(default_factory=list)  # the store lost them (flushed): nothing written, re-seed them


class StateStore:
    def __init__(self, client: redis.Redis, group: str, topic: str) -> None:
        self.client = client
        self.prefix = f"mlops:drift:{group}:{topic}"
        self.token = secrets.token_hex(8)  # tells this consumer's epochs from another's after a flush
        self.alerts = AlertStates(client, self.prefix)  # keys (model, version, feature)
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._save = client.register_script(SAVE_SCRIPT)

    def _hash_key(self, partition: int) -> str:
        return f"{self.prefix}:p:{partition}"

    def _owner_key(self, partition: int) -> str:
        return f"{self.prefix}:owner:{partition}"

    def _ids_key(self, partition: int) -> str:
        return f"{self.prefix}:ids:{partition}"

    def _legacy_key(self, partition: int) -> str:
        return f"{self.prefix}:ckpt:{partition}"

    def owner(self, epoch: int) -> str:
        return f"{epoch}:{self.token}"

    # -- checkpoints ------------------------------------------------------------------------------

    def claim(self, partition: int) -> tuple[int, PartitionCheckpoint | None]:
        """Take a partition over: a new owner epoch (fencing out the previous owner) and its checkpoint."""
        epoch, flat, legacy, ids = self._claim(keys=[self._owner_key(partition), self._hash_key(partition),
                                                     self._legacy_key(partition), self._ids_key(partition)],
                                               args=[self.token])
        ckpt = PartitionCheckpoint.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
        if ckpt is None and legacy:
            ckpt = PartitionCheckpoint.from_json(legacy)
            ckpt.windows.mark_all_dirty()  # the first save writes it in the new layout
        if ckpt is not None:
            ckpt.epoch = int(epoch)
            ckpt.windows.load_ids(_slot_fields(dict(zip(ids[::2], ids[1::2], strict=True))))
        return int(epoch), ckpt

    def save(self, checkpoints: dict[int, PartitionCheckpoint], reseed: set[int] | frozenset[int] = frozenset()
             ) -> SaveResult:
        """Write the changed slots and offsets of these partitions atomically. Partitions in ``reseed`` whose owner
        key is gone are rewritten whole (all their slots must be dirty) with this consumer as owner. Returns the
        partitions taken over by another consumer and those the store lost (nothing written for either).
        Raises ``redis.RedisError``."""
        keys: list[str] = [f"{self.prefix}:partitions"]
        args: list[bytes | str | int] = []
        written = {}
        for partition, ckpt in checkpoints.items():
            if ckpt.offset is None:
                continue
            windows = ckpt.windows
            dirty, dropped = set(windows.dirty), set(windows.dropped)
            ids, rewrite = windows.pending_ids(), windows.ids_rewrite
            fields: list[bytes | str] = [META, _meta_encoder.encode((ckpt.offset, ckpt.consumed, ckpt.dead_lettered))]
            for slot in dirty:
                fields += [f"s:{slot}", windows.slot_blob(slot)]
            id_fields: list[bytes | str] = []
            for slot, raw in ids.items():
                id_fields += [f"s:{slot}", raw]
            keys += [self._hash_key(partition), self._owner_key(partition), self._ids_key(partition)]
            args += [partition, self.owner(ckpt.epoch), int(partition in reseed), len(fields) // 2, len(dropped),
                     int(rewrite), len(ids), *fields, *(f"s:{s}" for s in dropped), *id_fields]
            written[partition] = (dirty, dropped, ids, rewrite)
        if not written:
            return SaveResult()
        fenced_raw, lost_raw = self._save(keys=keys, args=args)
        result = SaveResult(sorted(int(p) for p in fenced_raw), sorted(int(p) for p in lost_raw))
        for partition, (dirty, dropped, ids, rewrite) in written.items():
            if partition not in result.fenced and partition not in result.lost:
                checkpoints[partition].windows.mark_saved(dirty, dropped, ids, rewrite)
        return result

    def ping(self) -> None:
        """Raises ``redis.RedisError`` while Redis is unreachable."""
        self.client.ping()

    def load(self, partition: int) -> PartitionCheckpoint | None:
        """A partition's whole checkpoint, request ids included (read-only: no claim)."""
        ckpt = PartitionCheckpoint.from_hash(self.client.hgetall(self._hash_key(partition)))
        if ckpt is None:
            legacy = self.client.get(self._legacy_key(partition))
            ckpt = PartitionCheckpoint.from_json(legacy) if legacy else None
        if ckpt is not None:
            ckpt.windows.load_ids(_slot_fields(self.client.hgetall(self._ids_key(partition))))
        return ckpt

    def partitions(self) -> list[int]:
        return sorted(int(p) for p in self.client.smembers(f"{self.prefix}:partitions"))

    def load_all(self, partitions: list[int] | None = None) -> dict[int, PartitionCheckpoint]:
        """Checkpoints of these partitions (default: every partition ever saved for this group and topic),
        without their request ids (the evaluations need only the counts)."""
        partitions = self.partitions() if partitions is None else partitions
        if not partitions:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.hgetall(self._hash_key(p))
            hashes = pipe.execute()
        loaded = {p: PartitionCheckpoint.from_hash(h) for p, h in zip(partitions, hashes, strict=True)}
        return {p: c for p, c in loaded.items() if c is not None}
