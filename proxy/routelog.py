"""The routing log's writer: what answered each request to the router's name, kept in the store.

Owns: ``RouteLog``, the bounded in-memory buffer the chat handler hands one entry per routed (or
default-model) request to, answered or not, and the background loop that writes the buffer to the
store every ``SATROUTE_ROUTE_LOG_FLUSH_S`` in one ``Store.log_routes`` call on a worker thread,
trimming the table to ``SATROUTE_ROUTE_LOG_KEEP`` rows. ``record`` does no I/O and never raises: when
the buffer is full the oldest pending entry is dropped and counted, and the count is logged once per
write. A write that fails (disk full, the database locked past its busy timeout) puts its entries
back in front of the buffer, to be written by the next one; only what then overflows the buffer is
dropped (the write is one transaction: none of a failed batch was written). A write failing again
with the same error is not logged again; the first one that succeeds says so.
``stop`` writes whatever is pending (what a failed last write leaves is lost, and logged); the app's
lifespan calls it before background tasks are cancelled and the store is closed. Also reads recent
entries back for ``GET /admin/routes``.
``route_log_hook`` is the start-up hook that attaches the log to the app's ``Services`` when there
is a state store and ``SATROUTE_ROUTE_LOG`` is on; without a store there is no log.
Does not know: HTTP, routing policy or which requests count as routed (the handler decides), SQL
(``proxy.store``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from proxy.store import RouteEntry, Store

log = logging.getLogger("satroute.routelog")


class RouteLog:
    """Pending routing decisions, written to the store in batches by ``run``."""

    def __init__(self, store: Store, *, flush_s: float = 1.0, max_pending: int = 10000,
                 keep: int = 100000):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.store, self.flush_s, self.max_pending, self.keep = store, flush_s, max_pending, keep
        self.dropped = 0  # entries dropped since start (buffer full, or lost at shutdown)
        self.written = 0  # entries written since start
        self._pending: deque[RouteEntry] = deque()
        self._dropped_unreported = 0
        self._write_error: str | None = None  # why the last write failed (logged once); None: it did not
        self._stopping = asyncio.Event()
        self._write_lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, requested: str, chosen: str | None, *, scores: Mapping[str, float] | None = None,
               scorer_ms: float | None = None, failed: Sequence[tuple[str, str]] = (),
               request_id: str | None = None, degraded: str | None = None) -> None:
        """Queue one decision for the next write; drops the oldest pending one when full."""
        self.add(RouteEntry(requested=requested, chosen=chosen,
                            scores=None if scores is None else dict(scores), scorer_ms=scorer_ms,
                            failed=tuple(failed), request_id=request_id, degraded=degraded, at=time.time()))

    def add(self, entry: RouteEntry) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
            self._dropped_unreported += 1
        self._pending.append(entry)

    async def flush(self) -> int:
        """Write everything pending in one commit, off the event loop; returns how many rows."""
        async with self._write_lock:  # the loop's write and the final one never overlap
            if self._dropped_unreported:
                log.warning("routing log: %d entries dropped since the last write (more than %d "
                            "pending; SATROUTE_ROUTE_LOG_MAX_PENDING)", self._dropped_unreported,
                            self.max_pending)
                self._dropped_unreported = 0
            if not self._pending:
                return 0
            batch = list(self._pending)
            self._pending.clear()
            try:
                await asyncio.to_thread(self.store.log_routes, batch, self.keep)
            except (sqlite3.Error, OSError) as exc:
                # back in front of what came meanwhile, for the next write; the oldest overflow
                lost = max(0, len(batch) + len(self._pending) - self.max_pending)
                self._pending.extendleft(reversed(batch[lost:]))
                self.dropped += lost
                why = f"{type(exc).__name__}: {exc}"
                if lost or why != self._write_error:
                    log.error("routing log: %d entries not written, kept for the next write%s: %s",
                              len(batch), f" ({lost} dropped: more than {self.max_pending} pending)"
                              if lost else "", why)
                self._write_error = why
                return 0
            if self._write_error is not None:
                log.info("routing log: written again (%d entries)", len(batch))
                self._write_error = None
            self.written += len(batch)
            return len(batch)

    async def run(self) -> None:
        """Write every ``flush_s`` until ``stop``; a background task (``Services.spawn``)."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_s)
            await self.flush()

    async def stop(self) -> None:
        """End the loop and write what is still pending (before the store is closed)."""
        self._stopping.set()
        await self.flush()
        if self._pending:  # the last write failed: nothing writes them any more
            self.dropped += len(self._pending)
            log.error("routing log: %d entries lost at shutdown (the last write failed)",
                      len(self._pending))
            self._pending.clear()

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` written entries, newest first (read on a worker thread)."""
        return await asyncio.to_thread(self.store.recent_routes, limit)


def route_log_hook(store: Store) -> Callable[[Any], None]:
    """A start-up hook: attach a ``RouteLog`` to the app's Services and start its writer."""

    def hook(svc: Any) -> None:
        settings = svc.settings
        if not settings.route_log:
            return
        svc.route_log = RouteLog(store, flush_s=settings.route_log_flush_s,
                                 max_pending=settings.route_log_max_pending,
                                 keep=settings.route_log_keep)
        svc.spawn(svc.route_log.run(), "route-log")

    return hook
