"""Leader election for scheduler replicas sharing one PostgreSQL store.

One lease row (`leases`, name "leader") with a holder, an expiry and a fencing token. A replica
becomes leader by taking the row when it is free, expired, or held by an earlier incarnation of
itself (same replica id: it restarted); every takeover increments the token. The leader renews the
lease every `renew_s`; the others poll every `poll_s` and take over once it has expired, i.e. at
most `ttl_s + poll_s` after the leader's last renewal. The leader's store carries the token
(`Store.fence_token`) and every write of the control loop checks it in the same transaction
(PostgreSQL: the lease row is share-locked), so an ex-leader that was paused or partitioned and
wakes up after a takeover writes nothing (`Fenced`).

Expiry compares the replicas' wall clocks (time.time) with the value in the row: keep the
replicas' clocks in sync (NTP) to well within `ttl_s`; fencing keeps the store correct even if
they are not.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from scheduler.clock import Clock
from scheduler.store import Store

log = logging.getLogger("shoal.ha")


def default_replica_id(home: str) -> str:
    """Stable across restarts of the same replica (same host and SHOAL_HOME)."""
    return f"{socket.gethostname()}:{home}"


class LeaderElector:
    NOT_LEADER = -1  # a fence token no lease ever has: a follower's loop cannot write

    def __init__(self, store: Store, replica_id: str, clock: Clock, ttl_s: float = 8.0,
                 renew_s: float = 2.0, poll_s: float = 1.0):
        if not 0 < renew_s < ttl_s:
            raise ValueError(f"renew_s ({renew_s}) must be positive and shorter than ttl_s ({ttl_s})")
        self.store, self.replica_id, self.clock = store, replica_id, clock
        self.ttl_s, self.renew_s, self.poll_s = ttl_s, renew_s, poll_s
        self.token: int | None = None
        self._renewed_at = 0.0
        store.fence_token = self.NOT_LEADER

    @property
    def leading(self) -> bool:
        return self.token is not None

    def try_acquire(self) -> bool:
        token = self.store.try_acquire_lease(self.replica_id, self.ttl_s, self.clock.now())
        if token is not None:
            self.token, self._renewed_at = token, self.clock.now()
            self.store.fence_token = token
            log.info("leader (replica %s, fencing token %d)", self.replica_id, token)
        return token is not None

    def wait_for_leadership(self, stop: threading.Event) -> bool:
        """Poll until this replica leads (True) or `stop` is set (False). Store errors (database
        briefly unreachable) are logged and retried."""
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
            except Exception as e:  # noqa: BLE001 - keep trying
                log.warning("lease: %s", e)
            stop.wait(self.poll_s)
        return False

    def renew(self) -> bool:
        """False once the lease is lost: taken over, or not renewed within its TTL (the database
        unreachable) so another replica may have taken it."""
        if self.token is None:
            return False
        now = self.clock.now()
        try:
            ok = self.store.renew_lease(self.replica_id, self.token, self.ttl_s, now)
        except Exception as e:  # noqa: BLE001 - retried until the TTL runs out
            log.warning("lease renewal failed: %s", e)
            ok = now - self._renewed_at < self.ttl_s
            if not ok:
                self._lose("not renewed within its TTL")
            return ok
        if ok:
            self._renewed_at = now
        else:
            self._lose("taken over by another replica")
        return ok

    def _lose(self, why: str) -> None:
        log.error("lost the leader lease (token %s): %s", self.token, why)
        self.token = None
        self.store.fence_token = self.NOT_LEADER

    def keep_renewing(self, stop: threading.Event, on_lost: Callable[[], None]) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(self.renew_s):
                if not self.renew():
                    on_lost()
                    return

        t = threading.Thread(target=loop, name="shoal-lease", daemon=True)
        t.start()
        return t

    def release(self) -> None:
        if self.token is not None:
            try:
                self.store.release_lease(self.replica_id, self.token)
            except Exception as e:  # noqa: BLE001 - it expires on its own
                log.warning("lease release failed: %s", e)
            self.token = None
            self.store.fence_token = self.NOT_LEADER

