"""The queue of one batcher, fair across tenants: per-tenant lanes, fair-share admission, and
batches formed by deficit round robin.

Why. With one FIFO and one global bound, a tenant that floods fills the queue: everyone
else is refused (503) or waits behind the flood. Here both of the queue's decisions are
fair across the tenants that have work queued ("active" tenants), with nothing to
configure per tenant, and both stay work-conserving: capacity no one else wants is used.

Admission: a fair share of `capacity` (in items: rows, or texts). While the queue has room,
any request is admitted: a tenant alone may use all of it. When a request does not fit,
its tenant's share is `capacity / active` (counting itself):
- a tenant holding its share or more is refused (`QueueFull`, reason "full"): it is the
  one to back off;
- a tenant below its share still gets in: the youngest requests of the tenant holding the
  most are pushed out until it fits. They fail with `QueueFull` (reason "pushed_out") and
  their callers get the same 503 with `Retry-After` as a refusal. The youngest, since the
  oldest are next in line and have waited longest; whole requests, since half a request
  is worth nothing to its caller. Room is taken only from what that tenant holds above
  its own share: if that is not enough (the queue is full and about evenly shared), the
  request is refused instead, and nothing is pushed out for it.
The queue never holds more than `capacity` items. Refusals and pushing out go by items
held, not by requests or rates, so a tenant cannot buy a bigger share by sending bigger,
smaller or more frequent requests.

Formation: deficit round robin (DRR). Active tenants sit in a ring. A visit gives the tenant
at the head `quantum` of credit; it puts its queued chunks into the batch, oldest first,
while its credit pays for them, then the next tenant is visited. A chunk costs its rows
(tensors) or its tokens (text), a text at least one slot's share of the token budget,
since a text batch is bounded by its count as much as by its tokens. Batches are cut from
this one sequence of visits: a batch that fills mid-visit ends there, and the next batch
resumes that visit, so batch boundaries change nobody's share. Over many batches every
backlogged tenant is served the same (within a quantum and a chunk), whatever the size or
rate of its requests. The quantum is a quarter of a batch: under contention several
tenants share each batch; alone, a tenant fills a batch in a few visits.

Light tenants' latency. A tenant whose lane was empty goes first in the next batch, for one
visit, before the ring (FQ-CoDel's "new flows"; only an empty lane qualifies, so a
backlogged tenant cannot claim it). And a batch carrying such work while others are
backlogged gives each of those one visit of one chunk and goes: it is small, so it computes
quickly. A light tenant's request then waits for the batch in compute plus a short one of
its own, not for a full batch of the flood's work. The backlogged tenants lose a little
batching efficiency per light request, no share (what a visit did not spend stays as
credit, up to a cap), and never starve (each gets a chunk in every batch). With nobody
else backlogged (one busy tenant), batches are whole as before.

Text keeps batches of similar lengths: a batch grows around its first text, and a visit
takes, of the first `window` texts in its tenant's lane, those nearest in length to it
first; it passes over (leaves queued, uncharged) texts that would pad the batch to more
than about twice their length or break the token budget, `max_batch_size` at most per
visit. A batch stops looking after passing over `window` texts, or once a whole round of
visits found nothing to add.

What it costs. Admitting is O(1) per chunk plus O(log tenants) to file the tenant in a
heap by items held; refusing a tenant at its share is O(1); finding the tenant holding the
most (when the queue is full and a tenant below its share arrives) is O(log tenants)
amortised: the heap is lazy, entries that fell behind are re-filed or dropped as they
surface, and it is rebuilt once it holds twice as many entries as there are tenants.
Forming a batch is O(chunks examined + tenants visited), bounded by the batch, the
lookahead and the window, not by the number of tenants or the queue's length. The oldest
queued chunk (for the delay) is found in O(1) amortised. A lane lives only while its
tenant has work queued, so memory follows the active tenants.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Generic, TypeVar

__all__ = ["FULL", "PUSHED_OUT", "Chunk", "FairQueue", "Job", "QueueFull"]

P = TypeVar("P")  # what one chunk carries into compute
R = TypeVar("R")  # what compute gives back per chunk

# Why a request was refused: a bounded label set for metrics, never a tenant id.
FULL = "full"
PUSHED_OUT = "pushed_out"

# Tokens of padding a short text may take on top of doubling its length (CLS/SEP and such).
_LENGTH_SLACK = 8


class QueueFull(Exception):
    """The request does not fit its tenant's share of a full queue, or was pushed out."""

    def __init__(self, message: str, *, reason: str = FULL) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False, slots=True)
class Job(Generic[R]):
    """One submitted request: its future, its tenant and deadline, its results so far."""

    future: asyncio.Future[list[R]]
    tenant: str
    deadline: float
    results: list[Any]
    left: int


@dataclass(eq=False, slots=True)
class Chunk(Generic[P]):
    job: Job[Any]
    index: int
    payload: P
    rows: int  # >= 1
    tokens: int  # tokens of a text chunk (unpadded); 0 for tensors
    cost: int  # what a visit pays for it
    enqueued: float
    queued: bool = True


@dataclass(eq=False, slots=True)
class _Lane:
    """One tenant's queued chunks, oldest first, and its DRR credit."""

    tenant: str
    chunks: deque[Chunk[Any]] = field(default_factory=deque)
    rows: int = 0
    credit: int = 0
    visiting: bool = False  # has had this visit's quantum (a batch ended mid-visit)
    filed: int = -1  # the sequence number of its current entry in the heaviest-first heap


class _Visit(Enum):
    DONE = auto()  # the lane is empty, or has nothing more to add to this batch
    SHORT = auto()  # its next chunk costs more than its credit
    STOP = auto()  # the batch is full (or the window spent): it ends mid-visit


@dataclass(slots=True)
class _Forming:
    """The batch being formed and what limits it."""

    now: float
    chunks: list[Chunk[Any]] = field(default_factory=list)
    rows: int = 0
    shortest: int = 0
    longest: int = 0
    passed: int = 0  # texts passed over for this batch
    sip: bool = False  # a visit takes one chunk at most (a batch for idle tenants' work)


class FairQueue(Generic[P]):
    """Chunks of requests, per tenant; `admit` one request's, `form` the next batch."""

    def __init__(
        self,
        *,
        capacity: int,
        max_batch_size: int,
        max_batch_tokens: int | None = None,
        quantum: int | None = None,
        expire: Callable[[Job[Any]], None] = lambda job: None,
    ) -> None:
        self.capacity = capacity
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        if max_batch_tokens is None:
            self._floor = 1
            self._largest = max_batch_size  # a tensor chunk has at most a batch of rows
        else:
            self._floor = max(1, max_batch_tokens // max_batch_size)
            self._largest = max(max_batch_tokens, self._floor)
        self.quantum = quantum or max(1, self._largest // 4)
        # A lane that keeps being passed over banks credit up to here; never so little that
        # the dearest chunk could not be paid for.
        self._cap = self.quantum + self._largest
        self.window = 4 * max_batch_size  # texts a visit looks at, and may pass over
        # Called with a job found past its deadline (dropped before compute); it must finish
        # the job's future, so that the job's other chunks are dropped as done.
        self._expire = expire
        self._lanes: dict[str, _Lane] = {}  # every listed lane, by tenant
        self._new: deque[_Lane] = deque()  # lanes that were idle, first served first
        self._ring: deque[_Lane] = deque()  # lanes that have had a visit and still have work
        self._arrivals: deque[Chunk[Any]] = deque()  # every queued chunk, in arrival order
        # Lanes by rows held, heaviest first (negated), for pushing out. Lazy: an entry is
        # current only if it is its lane's latest (`filed`); rows that fell since are
        # re-filed when the entry comes to the top.
        self._heavy: list[tuple[int, int, _Lane]] = []
        self._filings = itertools.count()
        self.rows = 0  # items queued
        self.tokens = 0  # text tokens queued (unpadded)
        self.active = 0  # tenants with chunks queued

    # -- admission ---------------------------------------------------------------------------

    def cost(self, rows: int, tokens: int) -> int:
        # Never above what a lane can bank: a chunk too big for one batch still goes (alone).
        spent = rows if self.max_batch_tokens is None else max(tokens, self._floor)
        return min(spent, self._largest)

    def check(self, tenant: str, rows: int) -> None:
        """Raise `QueueFull` if a request of `rows` items from `tenant` would be refused now
        (a cheap look before work that only an admitted request needs, e.g. tokenizing)."""
        if self.rows + rows > self.capacity:
            self._room(tenant, rows)

    def admit(
        self, job: Job[Any], items: Sequence[tuple[P, int, int]], now: float
    ) -> list[Job[Any]]:
        """Queue the `(payload, rows, tokens)` chunks of `job`; returns the jobs pushed out
        to make room (their chunks are gone; failing them is the caller's). Raises
        `QueueFull` if `job` does not fit its tenant's share."""
        rows = sum(item[1] for item in items)
        pushed = self._make_room(job.tenant, rows) if self.rows + rows > self.capacity else []
        lane = self._lanes.get(job.tenant)
        if lane is None:
            lane = self._lanes[job.tenant] = _Lane(job.tenant)
            self._new.append(lane)
        if not lane.rows:
            self.active += 1
        tokens = 0
        for index, (payload, n, length) in enumerate(items):
            chunk = Chunk(job, index, payload, n, length, self.cost(n, length), now)
            lane.chunks.append(chunk)
            self._arrivals.append(chunk)
            tokens += length
        lane.rows += rows
        self.rows += rows
        self.tokens += tokens
        self._file(lane)
        return pushed

    def _room(self, tenant: str, rows: int) -> _Lane:
        """The tenant whose youngest requests would be pushed out to make room for `rows`
        more items from `tenant`, or `QueueFull`."""
        if rows > self.capacity:
            raise QueueFull(f"{rows} items are more than the whole queue holds ({self.capacity})")
        lane = self._lanes.get(tenant)
        held = lane.rows if lane is not None else 0
        active = self.active + (0 if held else 1)
        if held * active >= self.capacity:
            raise QueueFull(f"the queue is full and {held} items of yours, your share, wait in it")
        # Room comes from the tenant holding the most, and only from what it holds above
        # its own share.
        need = self.rows + rows - self.capacity
        heaviest = self._heaviest()
        if heaviest is lane or (heaviest.rows - need) * active < self.capacity:
            raise QueueFull("the queue is full, evenly shared among its tenants")
        return heaviest

    def _make_room(self, tenant: str, rows: int) -> list[Job[Any]]:
        victim = self._room(tenant, rows)
        need = self.rows + rows - self.capacity
        pushed: list[Job[Any]] = []
        while need > 0:  # whole requests, youngest first
            job = victim.chunks[-1].job
            while victim.chunks and victim.chunks[-1].job is job:
                chunk = victim.chunks.pop()
                self._forget(victim, chunk)
                need -= chunk.rows
            if not job.future.done():
                pushed.append(job)
        return pushed

    def _file(self, lane: _Lane) -> None:
        lane.filed = next(self._filings)
        heapq.heappush(self._heavy, (-lane.rows, lane.filed, lane))
        if len(self._heavy) > 2 * len(self._lanes) + 64:  # drop stale entries, amortised
            self._heavy = [(-o.rows, o.filed, o) for o in self._lanes.values() if o.rows]
            heapq.heapify(self._heavy)

    def _heaviest(self) -> _Lane:
        """The lane holding the most (the queue is full, so some lane holds something)."""
        heavy = self._heavy
        while True:
            held, filed, lane = heavy[0]
            if filed != lane.filed or self._lanes.get(lane.tenant) is not lane or not lane.rows:
                heapq.heappop(heavy)  # superseded, or the lane has left
            elif -held != lane.rows:  # it holds less than when filed: file it again
                lane.filed = next(self._filings)
                heapq.heapreplace(heavy, (-lane.rows, lane.filed, lane))
            else:
                return lane

    # -- state ----------------------------------------------------------------------------

    def _forget(self, lane: _Lane, chunk: Chunk[Any]) -> None:
        """Count out a chunk that has left `lane` (into a batch, dropped, or pushed out)."""
        chunk.queued = False
        lane.rows -= chunk.rows
        self.rows -= chunk.rows
        self.tokens -= chunk.tokens
        if not lane.rows:
            self.active -= 1
            if not self.rows:
                self._arrivals.clear()

    def oldest(self) -> float:
        """When the oldest queued chunk arrived (the queue must not be empty)."""
        arrivals = self._arrivals
        while not arrivals[0].queued:
            arrivals.popleft()
        return arrivals[0].enqueued

    def full(self, early: int = 0) -> bool:
        """Enough is queued for a whole batch (or for the preferred size `early`)."""
        rows = self.rows
        if rows >= self.max_batch_size or (early and rows >= early):
            return True
        return self.max_batch_tokens is not None and self.tokens >= self.max_batch_tokens

    def clear(self) -> list[Job[Any]]:
        """Empty the queue; the jobs that had chunks in it."""
        jobs = {id(c.job): c.job for lane in self._lanes.values() for c in lane.chunks}
        self._lanes.clear()
        self._new.clear()
        self._ring.clear()
        self._arrivals.clear()
        self._heavy.clear()
        self.rows = self.tokens = self.active = 0
        return list(jobs.values())

    # -- formation ------------------------------------------------------------------------

    def form(self, now: float) -> list[Chunk[P]]:
        """The next batch, by deficit round robin over the tenants' lanes. Chunks of jobs
        that are done (cancelled, failed) or past their deadline at `now` are dropped."""
        forming = _Forming(now)
        ring = self._ring
        backlogged = len(ring)
        # Tenants that were idle go first, one visit each, as FQ-CoDel serves new flows:
        # a tenant with little to do does not wait for the backlogged ones' turns.
        while self._new:
            turn = self._turn(self._new, forming)
            if turn is _Visit.STOP:
                return forming.chunks
        # If this batch carries such a tenant's work while others are backlogged, these get
        # one visit of one chunk each (so that none starves) and the batch goes: a small
        # batch, computed soon, is what keeps a light tenant's latency near its unloaded
        # latency under a flood. Otherwise, a whole batch.
        forming.sip = bool(forming.chunks and backlogged)
        visits = backlogged if forming.sip else -1
        fruitless = 0  # visits in a row that found nothing they could add
        while ring and visits:
            lane, took = ring[0], len(forming.chunks)
            turn = self._turn(ring, forming)
            if turn is None:
                continue  # an empty lane left the ring
            if turn is _Visit.STOP:
                break  # this visit goes on in the next batch
            visits -= 1
            # A lane short of credit gets more on its next visit: it pays in the end.
            if turn is _Visit.SHORT or len(forming.chunks) > took:
                fruitless = 0
            elif lane.chunks:  # (text) it had only texts that do not fit this batch
                fruitless += 1
                if fruitless >= len(ring):
                    break  # a whole round added nothing: no fitting text is left
        return forming.chunks

    def _turn(self, lanes: deque[_Lane], forming: _Forming) -> _Visit | None:
        """Visit `lanes[0]`; then it goes to the back of the ring, or leaves if it is empty.
        None if it was empty already (pushed out while it waited)."""
        lane = lanes[0]
        if not lane.chunks:
            self._retire(lanes)
            return None
        if not lane.visiting:
            lane.credit = min(lane.credit + self.quantum, self._cap)
            lane.visiting = True
        if self.max_batch_tokens is None:
            outcome = self._visit_rows(lane, forming)
        else:
            outcome = self._visit_text(lane, forming)
        if outcome is _Visit.STOP:
            return outcome
        lane.visiting = False
        if lane.chunks:
            lanes.popleft()
            self._ring.append(lane)
        else:
            self._retire(lanes)
        return outcome

    def _retire(self, lanes: deque[_Lane]) -> None:
        lane = lanes.popleft()
        lane.credit = 0  # a lane that empties keeps no credit, as in DRR
        lane.visiting = False
        del self._lanes[lane.tenant]

    def _live(self, chunk: Chunk[Any], now: float) -> bool:
        job = chunk.job
        if job.future.done():  # cancelled by its caller, or failed in another chunk
            return False
        if now > job.deadline:
            self._expire(job)
            return False
        return True

    def _visit_rows(self, lane: _Lane, forming: _Forming) -> _Visit:
        """Tensors: the lane's chunks in order while its credit pays and the batch has room."""
        chunks = lane.chunks
        while chunks:
            chunk = chunks[0]
            if not self._live(chunk, forming.now):
                chunks.popleft()
                self._forget(lane, chunk)
                continue
            if chunk.cost > lane.credit:
                return _Visit.SHORT
            if forming.chunks and forming.rows + chunk.rows > self.max_batch_size:
                return _Visit.STOP
            chunks.popleft()
            self._forget(lane, chunk)
            lane.credit -= chunk.cost
            forming.chunks.append(chunk)
            forming.rows += chunk.rows
            if forming.rows >= self.max_batch_size:
                return _Visit.STOP
            if forming.sip:
                break
        return _Visit.DONE

    def _visit_text(self, lane: _Lane, forming: _Forming) -> _Visit:
        """Text: of the first `window` texts in the lane, those that fit the batch (its
        length range and token budget), closest in length to the batch's first text first,
        while the lane's credit pays for them."""
        assert self.max_batch_tokens is not None
        budget, limit = self.max_batch_tokens, self.max_batch_size
        chunks = lane.chunks
        window = list(itertools.islice(chunks, self.window))
        gone: list[int] = []  # positions in the lane to delete: taken, or dropped
        live: list[int] = []
        for position, chunk in enumerate(window):
            if self._live(chunk, forming.now):
                live.append(position)
            else:
                gone.append(position)
                self._forget(lane, chunk)
        outcome = _Visit.DONE
        if live:
            # The batch grows around its first text (this lane's oldest, if the batch is
            # empty): the texts nearest to it in length, the older first among equals.
            anchor = forming.chunks[0].tokens if forming.chunks else window[live[0]].tokens
            live.sort(key=lambda p: abs(window[p].tokens - anchor))
        passed = 0
        for position in live:
            chunk = window[position]
            count = len(forming.chunks)
            longest = max(forming.longest, chunk.tokens, 1)
            shortest = min(forming.shortest, chunk.tokens) if count else chunk.tokens
            # Padding a text to more than about twice its length costs more than running
            # it in a batch of its own.
            if count and ((count + 1) * longest > budget or longest > 2 * shortest + _LENGTH_SLACK):
                forming.passed += 1
                if forming.passed >= self.window:
                    outcome = _Visit.STOP
                    break
                passed += 1
                if passed >= limit:  # the rest are farther still from the batch's lengths
                    break
                continue
            if chunk.cost > lane.credit:
                outcome = _Visit.SHORT
                break
            gone.append(position)
            self._forget(lane, chunk)
            lane.credit -= chunk.cost
            forming.chunks.append(chunk)
            forming.rows += chunk.rows
            forming.longest, forming.shortest = longest, shortest
            if count + 1 >= limit or (count + 2) * longest > budget:
                outcome = _Visit.STOP
                break
            if forming.sip:
                break
        for position in sorted(gone, reverse=True):
            del chunks[position]
        return outcome
