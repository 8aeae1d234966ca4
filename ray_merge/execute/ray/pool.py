"""Work items spread over a set of Ray actors: the one pool behind merge workers and evolve's evaluators.

``ray.util.ActorPool`` hands items to idle actors in order, but a merge and a search need more of it: an
actor may take only some items (a shard must fit its memory budget), may hold several at once (an
evaluator merges one candidate while it scores another), may die mid-item (Ray restarts it, or it is gone),
and an item may hang (a per-item timeout). ``WorkPool`` does that dispatching on top of ``ray.wait``;
what to do about a failure (retry the item elsewhere, replace the actor, give up) is the caller's policy,
told through the :class:`Outcome` s that :meth:`WorkPool.outcomes` yields.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

# An actor's in-flight item ended because the actor is gone (crashed, killed, lost with its node).
ACTOR_ERRORS_NAMES = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "OutOfMemoryError",
                      "WorkerCrashedError", "NodeDiedError")


# How long a probe keeps asking an actor that Ray reports as restarting (ActorUnavailableError).
RESTART_WAIT_S = 300.0


def actor_died(e: BaseException) -> bool:
    """Whether ``e`` (from ``ray.get``) means the actor or its process died, not that the item raised."""
    return type(e).__name__ in ACTOR_ERRORS_NAMES


@dataclass
class Outcome:
    """What became of one submitted item.

    kind: "result" (``value`` holds it), "error" (the item raised: ``error``), "died" (the actor died while
    it held the item: ``error``), "timeout" (the item ran past its timeout; the actor still runs it), or
    "actor_back" / "actor_gone" (after a death: Ray restarted the actor, or it is gone for good; ``item``
    is None).
    """

    kind: str
    actor: int
    item: Any = None
    value: Any = None
    error: Optional[BaseException] = None
    elapsed: float = 0.0


@dataclass
class _Inflight:
    actor: int
    item: Any
    started: float
    deadline: Optional[float]


class WorkPool:
    """Actors that take up to ``slots`` items each.

    ``call(actor, item)`` submits an item and returns its ObjectRef; ``next_item(index)`` says which
    pending item actor ``index`` should take now (None: nothing it can take), so the caller keeps the
    queue and its policy (which items fit which actor, what goes first). ``probe(actor)`` returns an
    ObjectRef that resolves once a restarted actor is usable again (e.g. a trivial method call).
    """

    def __init__(self, actors: list, call: Callable[[Any, Any], Any], *, slots: int = 1,
                 probe: Optional[Callable[[Any], Any]] = None, timeout_s: Optional[float] = None,
                 poll_s: float = 1.0):
        self.actors = list(actors)
        self.call = call
        self.slots = slots
        self.probe = probe
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.state = ["ready"] * len(self.actors)  # ready | probing | gone
        self._inflight: dict[Any, _Inflight] = {}
        self._probes: dict[Any, int] = {}
        self._restart_deadline: dict[int, float] = {}  # actor -> when a probe stops waiting for its restart
        self._timed_out: set = set()

    # -- the actors ------------------------------------------------------
    def load(self, index: int) -> int:
        """Items actor ``index`` holds now (timed-out ones included: it is still running them)."""
        return sum(1 for f in self._inflight.values() if f.actor == index)

    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.state) if s != "gone"]

    def retire(self, index: int) -> list:
        """Stop using actor ``index``; returns the items it still held (their refs are dropped)."""
        self.state[index] = "gone"
        return self._drop(index)

    def replace(self, index: int, actor) -> list:
        """Use ``actor`` in place of actor ``index`` (e.g. after killing a hung one); returns the dropped items."""
        items = self._drop(index)
        self.actors[index] = actor
        self.state[index] = "ready"
        return items

    def _drop(self, index: int) -> list:
        refs = [r for r, f in self._inflight.items() if f.actor == index]
        for r in refs:
            self._timed_out.discard(r)
        items = [self._inflight.pop(r).item for r in refs]
        for r in [r for r, i in self._probes.items() if i == index]:
            del self._probes[r]
        self._restart_deadline.pop(index, None)
        return items

    # -- dispatching -----------------------------------------------------
    def _fill(self, next_item: Callable[[int], Any]) -> None:
        for i, actor in enumerate(self.actors):
            while self.state[i] == "ready" and self.load(i) < self.slots:
                item = next_item(i)
                if item is None:
                    break
                now = time.monotonic()
                ref = self.call(actor, item)
                deadline = now + self.timeout_s if self.timeout_s else None
                self._inflight[ref] = _Inflight(i, item, now, deadline)

    def busy(self) -> bool:
        return bool(self._probes) or any(r not in self._timed_out for r in self._inflight)

    def outcomes(self, next_item: Callable[[int], Any]) -> Iterator[Outcome]:
        """Dispatch and yield outcomes until nothing is in flight and no actor takes another item.

        The caller may requeue items (``next_item`` will be asked again), ``retire`` or ``replace`` actors
        between outcomes. Items past their timeout are reported once and no longer waited for.
        """
        import ray

        while True:
            self._fill(next_item)
            if not self.busy():
                return
            waiting = [r for r in self._inflight if r not in self._timed_out] + list(self._probes)
            wait_s = self.poll_s
            deadlines = [f.deadline for r, f in self._inflight.items() if f.deadline and r not in self._timed_out]
            if deadlines:
                wait_s = max(0.0, min(wait_s, min(deadlines) - time.monotonic()))
            ready, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
            for ref in ready:
                yield from self._settle(ref)
            now = time.monotonic()
            for ref, f in list(self._inflight.items()):
                if f.deadline and now >= f.deadline and ref not in self._timed_out:
                    self._timed_out.add(ref)
                    yield Outcome("timeout", f.actor, f.item, elapsed=now - f.started)

    def _settle(self, ref) -> Iterator[Outcome]:
        import ray

        if ref in self._probes:
            index = self._probes.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - any failure but "still restarting" means gone
                if type(e).__name__ == "ActorUnavailableError" and time.monotonic() < self._restart_deadline[index]:
                    time.sleep(min(self.poll_s, 0.5))  # Ray is restarting it: ask again
                    self._probes[self.probe(self.actors[index])] = index
                    return
                self.state[index] = "gone"
                self._restart_deadline.pop(index, None)
                yield Outcome("actor_gone", index)
                return
            self.state[index] = "ready"
            self._restart_deadline.pop(index, None)
            yield Outcome("actor_back", index)
            return
        f = self._inflight.pop(ref, None)
        if f is None:
            return
        self._timed_out.discard(ref)
        elapsed = time.monotonic() - f.started
        try:
            value = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - classified below, handed to the caller
            if not actor_died(e):
                yield Outcome("error", f.actor, f.item, error=e, elapsed=elapsed)
                return
            yield Outcome("died", f.actor, f.item, error=e, elapsed=elapsed)
            if self.state[f.actor] == "ready":
                if self.probe is None:
                    self.state[f.actor] = "gone"
                    yield Outcome("actor_gone", f.actor)
                else:  # Ray may restart it: a probe says when, or that it is gone
                    self.state[f.actor] = "probing"
                    self._restart_deadline[f.actor] = time.monotonic() + RESTART_WAIT_S
                    self._probes[self.probe(self.actors[f.actor])] = f.actor
            return
        yield Outcome("result", f.actor, f.item, value=value, elapsed=elapsed)
