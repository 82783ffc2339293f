"""The alert state every alerting job of the stack keeps in Redis: one key per alerted thing, shared by the
whole consumer group (or every run of a periodic check), changed only by compare-and-set.

Why a compare-and-set: several consumers see the same window and decide the same change at about the same
time; only the one whose set finds the old state makes the change and publishes the alert, so one state
change is one alert however many processes judge it. A publish that fails for good puts the previous state
back (:meth:`AlertStates.revert`), so the next evaluation announces it again. After Redis lost its data,
a process puts back the states it knew with set-if-absent (:meth:`AlertStates.restore`): a state written
since is newer and stays. "ok" is the default and has no key.

Keys: ``<prefix>:alert:<part>:<part>...`` (the key tuple joined by ``:``); one-off claims (:meth:`claim_once`,
events without a state, such as change points) ``<prefix>:once:<part>...`` with a time-to-live.
"""

from __future__ import annotations

import redis

CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1]) or 'ok'
if current == ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1])
return current
"""

AlertKey = tuple[str, ...]


class AlertStates:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._cas = client.register_script(CAS_SCRIPT)

    def _key(self, key: AlertKey) -> str:
        return f"{self.prefix}:alert:{':'.join(key)}"

    def get(self, key: AlertKey) -> str:
        return self.stored(key) or "ok"

    def stored(self, key: AlertKey) -> str | None:
        """The stored state, None when there is none (never set, or lost with a flush)."""
        raw = self.client.get(self._key(key))
        return raw.decode() if raw else None

    def transition(self, key: AlertKey, severity: str) -> str | None:
        """Set the state; returns the previous one if this call changed it, None if it already was ``severity``
        (another process made the change)."""
        previous = self._cas(keys=[self._key(key)], args=[severity])
        return previous.decode() if isinstance(previous, bytes) else previous or None

    def claim_once(self, key: AlertKey, ttl_s: float) -> bool:
        """True for the first process to claim ``key`` in ``ttl_s`` seconds (set-if-absent with expiry): the one
        that publishes a stateless event many processes detect at about the same time."""
        return bool(self.client.set(f"{self.prefix}:once:{':'.join(key)}", "1", nx=True,
                                    px=max(1, int(ttl_s * 1000))))

    def revert(self, key: AlertKey, severity: str) -> None:
        self.client.set(self._key(key), severity)

    def restore(self, states: dict[AlertKey, str]) -> int:
        """Put back states the store lost (set-if-absent); returns how many were put back."""
        todo = [(key, state) for key, state in states.items() if state != "ok"]
        if not todo:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for key, state in todo:
                pipe.set(self._key(key), state, nx=True)
            return sum(bool(done) for done in pipe.execute())
