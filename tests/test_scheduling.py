"""Which shard a merge worker does next (planner.shards.ShardQueue): own queue, orphans first, stealing,
memory budgets. Fake plans from metadata only: no Ray, no tensors."""
from __future__ import annotations

from ray_merge.planner.plan import Plan, PlannedTensor, Shard, TensorInput
from ray_merge.planner.shards import ShardQueue, assign_shards, shard_cost, shard_need


def fake_plan(sizes: list[int]) -> Plan:
    """One shard per size, holding one float32 tensor of that many elements (read once, written once).
    Its shape (1, n) cannot be split into rows, so a worker needs its whole working set (3x its bytes)."""
    tensors, shards = [], []
    for i, n in enumerate(sizes):
        name = f"t{i}"
        inp = TensorInput(model=0, tensor=name, file="model.safetensors", shape=(1, n), dtype="float32")
        tensors.append(PlannedTensor(name=name, shape=(1, n), out_dtype="float32", inputs=[inp], base_index=None,
                                     compute_dtype=None, params={}, model_params=[{}], method="copy",
                                     working_bytes=3 * 4 * n, shard=i))
        shards.append(Shard(index=i, filename=f"model-{i:05d}.safetensors", tensors=[name], nbytes=4 * n))
    return Plan(recipe=None, method="linear", models=[], tensors=tensors, shards=shards, out_config={}, donor=0)


def drain(queue: ShardQueue, worker: int) -> list[int]:
    out = []
    while (i := queue.next_for(worker)) is not None:
        out.append(i)
    return out


def test_fake_plan_costs():
    plan = fake_plan([10, 20])
    assert [shard_cost(plan, s) for s in plan.shards] == [80, 160]
    assert [shard_need(plan, s) for s in plan.shards] == [120, 240]


def test_each_worker_starts_with_its_assignment_in_index_order():
    plan = fake_plan([100, 90, 80, 70, 60, 50])
    loads = assign_shards(plan, plan.shards, [None, None])
    q = ShardQueue(plan, plan.shards, {0: None, 1: None})
    assert [list(q.queues[w]) for w in (0, 1)] == [w.shards for w in loads]
    firsts = [q.next_for(0), q.next_for(1)]
    assert firsts == [loads[0].shards[0], loads[1].shards[0]]
    assert q.pending() == sorted(set(range(6)) - set(firsts))


def test_worker_ids_need_not_be_dense():
    """The driver keys queues by worker rank; a worker that did not start has none."""
    plan = fake_plan([10, 10, 10, 10])
    q = ShardQueue(plan, plan.shards, {1: None, 3: None})
    assert sorted(q.queues) == [1, 3]
    assert sorted(drain(q, 1) + drain(q, 3)) == [0, 1, 2, 3]


def set_queues(q: ShardQueue, queues: dict[int, list[int]]) -> None:
    for w, shards in queues.items():
        q.queues[w].clear()
        q.queues[w].extend(shards)


def test_a_worker_done_early_steals_from_the_end_of_the_longest_queue():
    plan = fake_plan([10, 10, 10, 10, 10, 10])
    q = ShardQueue(plan, plan.shards, {0: None, 1: None, 2: None})
    set_queues(q, {0: [], 1: [0, 1], 2: [2, 3, 4, 5]})
    assert q.next_for(0) == 5
    assert list(q.queues[2]) == [2, 3, 4]


def test_stealing_goes_by_cost_not_count():
    plan = fake_plan([1000, 10, 10, 10])
    q = ShardQueue(plan, plan.shards, {0: None, 1: None, 2: None})
    set_queues(q, {0: [], 1: [0], 2: [1, 2, 3]})  # one big shard against three small ones
    assert q.next_for(0) == 0


def test_nothing_over_a_workers_budget():
    plan = fake_plan([100, 10, 10, 10])  # needs: 1200, 120, 120, 120 bytes
    q = ShardQueue(plan, plan.shards, {0: None, 1: 500})
    assert 0 in q.queues[0]  # the big shard goes to the unlimited worker
    assert 0 not in q.queues[1]
    set_queues(q, {0: [1, 0], 1: []})
    assert q.next_for(1) == 1  # stealing skips shard 0 (over its budget) for the one that fits
    assert q.next_for(1) is None
    assert q.next_for(0) == 0


def test_a_requeued_shard_goes_first_to_a_worker_it_fits():
    plan = fake_plan([100, 10, 10, 10])
    q = ShardQueue(plan, plan.shards, {0: None, 1: 500})
    q.next_for(0)
    q.requeue(0)  # worker 0 died while on shard 0
    small = q.next_for(1)
    assert small != 0 and small is not None  # too big for worker 1: it takes its own next shard
    assert q.next_for(0) == 0  # the redo, before worker 0's own queue
    q.requeue(2)
    q.requeue(3)
    assert list(q.orphans) == [3, 2]  # the latest first


def test_the_queue_of_a_gone_worker_goes_to_the_others():
    plan = fake_plan([10, 10, 10, 10, 10, 10])
    q = ShardQueue(plan, plan.shards, {0: None, 1: None})
    theirs = list(q.queues[1])
    assert q.orphan(1) == theirs and not q.queues[1]
    assert drain(q, 0)[:len(theirs)] == theirs  # orphans first, in order
    assert q.pending() == []


def test_a_run_where_a_worker_dies_does_every_shard_once():
    """A driver's loop without Ray: worker 1 dies during its second shard and does not come back."""
    plan = fake_plan([50, 40, 30, 20, 10, 10, 10, 5])
    q = ShardQueue(plan, plan.shards, {0: None, 1: None, 2: 300})
    done: dict[int, int] = {}  # shard -> worker
    holding = {w: q.next_for(w) for w in (0, 1, 2)}
    steps = 0
    while any(v is not None for v in holding.values()):
        steps += 1
        for w in (0, 1, 2):
            idx = holding[w]
            if idx is None:
                continue
            if w == 1 and steps == 2:
                q.requeue(idx)
                q.orphan(1)
                holding[1] = None
                continue
            assert idx not in done
            done[idx] = w
            holding[w] = q.next_for(w)
    assert sorted(done) == list(range(8))
    assert all(shard_need(plan, plan.shards[i]) <= 300 for i, w in done.items() if w == 2)
    assert sum(1 for w in done.values() if w == 1) == 1
