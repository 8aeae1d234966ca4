"""The shared Ray work pool (execute/ray/pool.py) on a local Ray instance, with tiny actors: results, errors,
an actor that dies mid-item (restarted by Ray, or gone), a hung item, several items at once per actor."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from conftest import local_ray

from ray_merge.execute.ray.pool import WorkPool

pytestmark = pytest.mark.timeout(300)


class Worker:
    """A tiny actor: ``work(item)`` doubles a number; "crash" ends its process, "hang" sleeps a minute,
    "fail" raises; ``slow:N`` sleeps a second and returns (start, end) times."""

    def work(self, item):
        if item == "crash":
            os._exit(1)
        if item == "hang":
            time.sleep(60)
        if item == "fail":
            raise ValueError("bad item")
        if isinstance(item, str) and item.startswith("slow:"):
            t0 = time.time()
            time.sleep(1.0)
            return (t0, time.time(), threading.get_ident())
        return 2 * item

    def ping(self):
        return True


@pytest.fixture(scope="module")
def ray_local():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    with local_ray("rmp") as ray:
        yield ray


def actor(ray, **options):
    return ray.remote(Worker).options(num_cpus=0, **options).remote()


def pool_of(actors, **kw) -> WorkPool:
    return WorkPool(actors, lambda a, item: a.work.remote(item), probe=lambda a: a.ping.remote(), poll_s=0.2, **kw)


def queue_of(items):
    todo = list(items)
    return todo, (lambda index: todo.pop(0) if todo else None)


def test_results_arrive(ray_local):
    pool = pool_of([actor(ray_local), actor(ray_local)])
    todo, next_item = queue_of(range(8))
    outs = list(pool.outcomes(next_item))
    assert {o.kind for o in outs} == {"result"}
    assert sorted((o.item, o.value) for o in outs) == [(i, 2 * i) for i in range(8)]
    assert {o.actor for o in outs} == {0, 1}


def test_an_item_that_raises_is_an_error_not_a_death(ray_local):
    pool = pool_of([actor(ray_local)])
    _, next_item = queue_of(["fail", 1])
    outs = list(pool.outcomes(next_item))
    assert [o.kind for o in outs] == ["error", "result"]
    assert "bad item" in str(outs[0].error) and outs[0].item == "fail"
    assert pool.live() == [0]


def test_an_actor_killed_mid_item_comes_back(ray_local):
    pool = pool_of([actor(ray_local, max_restarts=1)])
    _, next_item = queue_of(["crash", 1, 2])
    outs = list(pool.outcomes(next_item))
    assert [o.kind for o in outs] == ["died", "actor_back", "result", "result"]
    assert outs[0].item == "crash" and outs[1].item is None
    assert [o.value for o in outs[2:]] == [2, 4]


def test_an_actor_killed_mid_item_without_restarts_is_gone(ray_local):
    pool = pool_of([actor(ray_local, max_restarts=0), actor(ray_local)])
    todo = {0: ["crash", 1], 1: []}
    outs = list(pool.outcomes(lambda i: todo[i].pop(0) if todo[i] else None))
    assert [(o.kind, o.actor) for o in outs] == [("died", 0), ("actor_gone", 0)]
    assert pool.live() == [1] and todo[0] == [1]  # nothing more went to the dead actor


def test_a_hung_item_times_out_and_replace_drops_it(ray_local):
    ray = ray_local
    first = actor(ray)
    ray.get(first.ping.remote())  # started: the timeout counts from the dispatch
    pool = pool_of([first], timeout_s=2.0)
    todo, next_item = queue_of(["hang", 3])
    outs = []
    for o in pool.outcomes(next_item):
        outs.append(o)
        if o.kind == "timeout":
            assert pool.load(o.actor) == 1  # still running it
            fresh = actor(ray)
            ray.get(fresh.ping.remote())
            assert pool.replace(o.actor, fresh) == ["hang"]
            ray.kill(first)
    assert [o.kind for o in outs] == ["timeout", "result"]
    assert outs[0].item == "hang" and outs[0].elapsed >= 2.0
    assert outs[1].value == 6 and pool.load(0) == 0


def test_two_slots_run_two_items_at_once_on_a_threaded_actor(ray_local):
    pool = pool_of([actor(ray_local, max_concurrency=2)], slots=2)
    _, next_item = queue_of(["slow:a", "slow:b"])
    outs = list(pool.outcomes(next_item))
    assert [o.kind for o in outs] == ["result", "result"]
    (s0, e0, t0), (s1, e1, t1) = (o.value for o in outs)
    assert max(s0, s1) < min(e0, e1)  # both ran at the same time, on two threads
    assert t0 != t1
