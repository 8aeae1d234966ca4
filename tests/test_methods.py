"""Merge methods against independent formulas on small, hand-checkable tensors."""
from __future__ import annotations

import math

import pytest
import torch

from ray_merge.errors import UserError
from ray_merge.methods import _select, all_methods, get_method
from ray_merge.methods.api import merge_tensors
from ray_merge.methods.base import MergeInputs

ALL_METHODS = {
    "linear", "passthrough", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic",
    "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
    "breadcrumbs_ties", "sce", "model_stock", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}
RANDOMIZED = {"dare_linear", "dare_ties", "della", "della_linear"}


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _family(shape=(16, 12), n=3, seed=0):
    """A base tensor and n fine-tunes of it."""
    base = _rand(*shape, seed=seed, scale=0.02)
    return [base] + [base + _rand(*shape, seed=seed + 1 + i, scale=0.002) for i in range(n)]


def _ta(method, tensors, weights, params=None, seed=0, **per_model):
    """Run a base-first task-arithmetic style call with per-model lists."""
    mp = [{}] + [
        {"weight": w, **{k: v[i] for k, v in per_model.items()}} for i, w in enumerate(weights)
    ]
    return merge_tensors(method, tensors, base_index=0, params=params, model_params=mp, seed=seed)


# ---------------------------------------------------------------- registry


def test_every_documented_method_is_registered():
    assert set(all_methods()) == ALL_METHODS
    for name, method in all_methods().items():
        assert method.fn.__doc__ or getattr(method.fn, "func", None).__doc__, name
        assert method.randomized == (name in RANDOMIZED), name


@pytest.mark.parametrize(
    "method,param,default",
    [
        ("ties", "normalize", True), ("ties", "rescale", False), ("dare_ties", "normalize", False),
        ("dare_ties", "rescale", True), ("dare_linear", "rescale", True), ("della", "normalize", True),
        ("della", "epsilon", 0.15), ("della_linear", "normalize", False),
        ("breadcrumbs", "gamma", 0.01), ("breadcrumbs_ties", "normalize", False),
        ("task_arithmetic", "lambda", 1.0), ("task_arithmetic", "density", 1.0),
        ("ties", "int8_mask", False), ("sce", "select_topk", 1.0), ("karcher", "max_iter", 10),
        ("karcher", "tol", 1e-5), ("multislerp", "eps", 1e-8), ("multislerp", "normalize_weights", True),
        ("nuslerp", "nuslerp_flatten", True), ("nuslerp", "nuslerp_row_wise", False),
        ("model_stock", "filter_wise", False), ("ram", "epsilon", 1e-5), ("ramplus_tl", "r", 0.1),
        ("ramplus_tl", "alpha", 0.2), ("linear", "normalize", True),
    ],
)
def test_mergekit_defaults(method, param, default):
    assert get_method(method).param(param).default == default


@pytest.mark.parametrize("method,param", [("slerp", "t"), ("nearswap", "t"), ("ties", "weight"),
                                          ("linear", "weight"), ("nuslerp", "weight")])
def test_required_params(method, param):
    assert get_method(method).param(param).required


def test_task_vector_params_are_not_asked_of_the_base():
    for name in ("ties", "dare_ties", "della", "breadcrumbs", "task_arithmetic", "nuslerp", "multislerp"):
        assert get_method(name).param("weight").non_base, name
    assert not get_method("linear").param("weight").non_base
    # the base gets no weight and needs none
    ts = _family(n=1)
    merge_tensors("ties", ts, base_index=0, model_params=[{}, {"weight": 1.0, "density": 0.5}])


@pytest.mark.parametrize(
    "method,n,base,ok",
    [("slerp", 2, True, True), ("slerp", 3, True, False), ("slerp", 2, False, False),
     ("nearswap", 3, True, False), ("model_stock", 2, True, False), ("model_stock", 3, True, True),
     ("nuslerp", 2, False, True), ("nuslerp", 3, True, True), ("nuslerp", 3, False, False),
     ("ties", 1, False, False), ("passthrough", 2, False, False), ("multislerp", 1, True, False)],
)
def test_input_contracts(method, n, base, ok):
    m = get_method(method)
    if ok:
        m.check_inputs(n, base)
    else:
        with pytest.raises(UserError):
            m.check_inputs(n, base)


def test_unknown_and_missing_params_are_user_errors():
    ts = _family(n=1)
    with pytest.raises(UserError, match="needs parameter t"):
        merge_tensors("slerp", ts, base_index=0)
    with pytest.raises(UserError, match="unknown"):
        merge_tensors("slerp", ts, base_index=0, params={"t": 0.5, "bogus": 1})


# ---------------------------------------------------------------- generic properties


def _call(name, tensors, seed=0):
    """A valid call of any method on base-first ``tensors`` (at least 4)."""
    m = get_method(name)
    params = {"t": 0.4} if name in ("slerp", "nearswap") else {}
    if name in ("nearswap", "slerp", "arcee_fusion"):
        tensors = tensors[:2]
    if name == "passthrough":
        tensors = tensors[1:2]
    if name == "nuslerp":
        tensors = tensors[:3]
    base_index = None if m.base_model == "none" else 0
    mp = []
    for i in range(len(tensors)):
        d = {}
        if m.param("weight") and not (i == base_index and m.param("weight").non_base):
            d["weight"] = 0.5 + 0.25 * i
        if m.param("density") and i != base_index:
            d["density"] = 0.6
        mp.append(d)
    if name == "nearswap":
        params["t"] = 0.001
    return merge_tensors(name, tensors, base_index=base_index, params=params, model_params=mp, seed=seed)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_inputs_are_never_modified(name):
    tensors = _family((12, 10), n=3)
    copies = [t.clone() for t in tensors]
    out = _call(name, tensors)
    assert out.shape == tensors[0].shape
    assert torch.isfinite(out).all()
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_precisions(name, dtype):
    tensors = [t.to(dtype) for t in _family((12, 10), n=3)]
    out = _call(name, tensors)
    assert out.is_floating_point() and out.shape == tensors[0].shape
    assert torch.isfinite(out.float()).all()
    if name in RANDOMIZED or name == "arcee_fusion":
        return  # random masks / a threshold that rounding may move: see the oracle tests
    ref = _call(name, [t.float() for t in tensors])
    rtol = 1e-5 if dtype == torch.float64 else 2e-2
    # karcher keeps unit vectors in half precision (as mergekit): larger errors
    atol = rtol * 0.02 * (5 if name == "karcher" else 1)
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_result_dtype_is_declared(name):
    """Half inputs give half outputs, except where a method declares otherwise (as mergekit)."""
    out = _call(name, [t.to(torch.bfloat16) for t in _family((6, 5), n=3)])
    expected = get_method(name).extra.get("half_result_dtype", "bfloat16")
    assert out.dtype == getattr(torch, expected)
    assert _call(name, _family((6, 5), n=3)).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(RANDOMIZED))
def test_randomness_comes_only_from_the_generator(name):
    tensors = _family((20, 16), n=2)
    torch.manual_seed(1)
    a = _call(name, tensors, seed=5)
    torch.manual_seed(2)
    b = _call(name, tensors, seed=5)
    c = _call(name, tensors, seed=6)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(n for n in ALL_METHODS if get_method(n).row_splittable))
def test_row_splittable_methods_split_by_rows(name):
    tensors = _family((12, 10), n=3)
    whole = _call(name, tensors)
    parts = [_call(name, [t[r : r + 5] for t in tensors]) for r in range(0, 12, 5)]
    assert torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("name", ["ties", "task_arithmetic", "sce", "ram", "dare_ties", "breadcrumbs"])
def test_base_only_returns_base(name):
    base = _rand(5, 4)
    assert torch.equal(merge_tensors(name, [base], base_index=0), base)


# ---------------------------------------------------------------- linear / passthrough


def test_linear_weighted_average():
    a, b, c = _rand(6, 5, seed=1), _rand(6, 5, seed=2), _rand(6, 5, seed=3)
    mp = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]
    out = merge_tensors("linear", [a, b, c], model_params=mp)
    torch.testing.assert_close(out, (a + 2 * b + c) / 4)
    out = merge_tensors("linear", [a, b, c], model_params=mp, params={"normalize": False})
    torch.testing.assert_close(out, a + 2 * b + c)


def test_passthrough_scale():
    a = _rand(3, 3)
    assert torch.equal(merge_tensors("passthrough", [a]), a)
    torch.testing.assert_close(merge_tensors("passthrough", [a], model_params=[{"scale": 0.5}]), a / 2)


# ---------------------------------------------------------------- spherical


def _slerp(t, base, other):
    return merge_tensors("slerp", [base, other], base_index=0, params={"t": t})


def test_slerp_endpoints_and_midpoint():
    a, b = _rand(8, 4, seed=1), _rand(8, 4, seed=2)
    torch.testing.assert_close(_slerp(0.0, a, b), a)
    torch.testing.assert_close(_slerp(1.0, a, b), b)
    # orthogonal unit vectors: the midpoint is at 45 degrees
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(_slerp(0.5, e1, e2), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    expected = torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    torch.testing.assert_close(_slerp(1 / 3, e1, e2), expected)
    # the base may come second
    out = merge_tensors("slerp", [e2, e1], base_index=1, params={"t": 0.0})
    torch.testing.assert_close(out, e1)


def test_slerp_parallel_falls_back_to_lerp():
    a = _rand(10)
    torch.testing.assert_close(_slerp(0.25, a, 3 * a), 0.75 * a + 0.25 * 3 * a)


def test_nuslerp_t_from_weights_matches_slerp():
    a, b = _rand(8, 6, seed=1), _rand(8, 6, seed=2)
    out = merge_tensors("nuslerp", [a, b], model_params=[{"weight": 3.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, _slerp(0.25, a, b), rtol=1e-5, atol=1e-6)


def test_nuslerp_rows_and_columns():
    a, b = _rand(5, 6, seed=1), _rand(5, 6, seed=2)
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    rows = merge_tensors("nuslerp", [a, b], model_params=mp, params={"nuslerp_flatten": False})
    for r in range(5):
        torch.testing.assert_close(rows[r], _slerp(0.5, a[r], b[r]), rtol=1e-5, atol=1e-6)
    cols = merge_tensors("nuslerp", [a, b], model_params=mp,
                         params={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    for c in range(6):
        torch.testing.assert_close(cols[:, c], _slerp(0.5, a[:, c], b[:, c]), rtol=1e-5, atol=1e-6)


def test_nuslerp_with_base_interpolates_task_vectors():
    base, a, b = _family((6, 4), n=2)
    out = merge_tensors("nuslerp", [base, a, b], base_index=0,
                        model_params=[{}, {"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, base + _slerp(0.5, a - base, b - base), rtol=1e-5, atol=1e-7)


def test_multislerp_two_orthogonal_and_single():
    e1, e2 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    out = merge_tensors("multislerp", [e1, e2], model_params=mp)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0.0]) * math.sqrt(2), rtol=1e-5, atol=1e-6)
    assert torch.equal(merge_tensors("multislerp", [e1], model_params=[{"weight": 1.0}]), e1)


def test_multislerp_antipodal_pair_falls_back_to_linear():
    a = _rand(4)
    out = merge_tensors("multislerp", [a, -a], model_params=[{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.zeros(4))
    with pytest.raises(UserError):
        merge_tensors("multislerp", [a, -a, a, -a], model_params=[{"weight": 1.0}] * 4)


def test_karcher_mean_of_two_is_the_midpoint():
    e1, e2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    out = merge_tensors("karcher", [e1, e2])
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0]) / math.sqrt(2), rtol=1e-5, atol=1e-6)


def test_karcher_three_directions_converge_to_the_spherical_mean():
    # symmetric about (1,1,1): the Karcher mean must be along it, at the mean norm
    vs = [torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])]
    out = merge_tensors("karcher", vs, params={"max_iter": 50})
    torch.testing.assert_close(out, torch.full((3,), 2 / math.sqrt(3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(merge_tensors("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


# ---------------------------------------------------------------- task arithmetic family


def test_task_arithmetic_formula():
    base, a, b = _family(n=2)
    out = _ta("task_arithmetic", [base, a, b], [1.0, 0.5], params={"lambda": 0.8})
    torch.testing.assert_close(out, base + 0.8 * ((a - base) + 0.5 * (b - base)))
    out = _ta("task_arithmetic", [base, a, b], [1.0, 0.5], params={"normalize": True})
    torch.testing.assert_close(out, base + ((a - base) + 0.5 * (b - base)) / 1.5)


def test_ties_hand_built():
    base = torch.zeros(6)
    d1 = torch.tensor([3.0, -2.0, 0.5, 1.0, -4.0, 0.1])
    d2 = torch.tensor([-1.0, -3.0, 2.0, 0.2, 5.0, -0.3])
    # density 0.5 keeps the 3 largest |d|: d1 -> idx 0,1,4 ; d2 -> idx 1,2,4
    t1 = torch.tensor([3.0, -2.0, 0.0, 0.0, -4.0, 0.0])
    t2 = torch.tensor([0.0, -3.0, 2.0, 0.0, 5.0, 0.0])
    # elected signs from t1 + 2*t2 (weights 1, 2): [+, -, +, +(tie), +, +(tie)]
    # agreeing: idx0 t1 ; idx1 both ; idx2 t2 ; idx4 t2 only
    expected_sum = torch.tensor([3.0, -2.0 - 6.0, 4.0, 0.0, 10.0, 0.0])
    expected_weight = torch.tensor([1.0, 3.0, 2.0, 1.0, 2.0, 1.0])  # zeros divided by 1
    out = _ta("ties", [base, d1, d2], [1.0, 2.0], density=[0.5, 0.5], params={"normalize": False})
    torch.testing.assert_close(out, expected_sum)
    out = _ta("ties", [base, d1, d2], [1.0, 2.0], density=[0.5, 0.5])
    torch.testing.assert_close(out, expected_sum / expected_weight)


def test_ties_rescale_preserves_l1():
    base, a = _family(n=1)
    out = _ta("ties", [base, a], [1.0], density=[0.3], params={"rescale": True})
    delta = a - base
    kept = out - base
    assert (kept != 0).sum() == int(0.3 * delta.numel())
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())


def test_dare_keeps_density_and_rescales():
    base = torch.zeros(200, 200)
    delta = torch.ones(200, 200)
    out = _ta("dare_linear", [base, delta], [1.0], density=[0.3], seed=3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # every kept entry is scaled by the L1 ratio, about 1 / density
    scale = out[kept].unique()
    assert scale.numel() == 1
    assert scale.item() == pytest.approx(delta.numel() / kept.sum().item(), rel=1e-5)
    assert scale.item() == pytest.approx(1 / 0.3, rel=0.05)
    plain = _ta("dare_linear", [base, delta], [1.0], density=[0.3], seed=3, params={"rescale": False})
    assert torch.equal(plain != 0, kept) and plain[kept].eq(1).all()


def test_dare_ties_elects_signs():
    base = torch.zeros(1000)
    a, b = torch.ones(1000), -torch.ones(1000) * 0.5
    out = _ta("dare_ties", [base, a, b], [1.0, 1.0], density=[1.0, 1.0])
    torch.testing.assert_close(out, torch.ones(1000))  # density 1: plain TIES without trimming


def test_della_keeps_large_entries_more_often():
    base = torch.zeros(400, 100)
    delta = torch.arange(1, 101, dtype=torch.float32).repeat(400, 1)  # rank == column
    out = _ta("della_linear", [base, delta], [1.0], density=[0.5], epsilon=[0.4],
              params={"rescale": False})
    keep_rate = (out != 0).float().mean(dim=0)
    assert keep_rate[:10].mean() < 0.2 and keep_rate[-10:].mean() > 0.8
    assert abs(keep_rate.mean().item() - 0.5) < 0.02
    with pytest.raises(UserError, match="epsilon"):
        _ta("della", [base, delta], [1.0], density=[0.5], epsilon=[0.6])


def test_breadcrumbs_drops_smallest_and_largest():
    base = torch.zeros(100)
    delta = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    out = _ta("breadcrumbs", [base, delta], [1.0], density=[0.8], gamma=[0.05])
    kept = (out != 0).nonzero().squeeze(1) + 1  # magnitudes kept
    assert kept.tolist() == list(range(16, 96))  # bottom 15 and top 5 dropped
    torch.testing.assert_close(out[out != 0], delta[out != 0])
    # gamma larger than 1 - density: only 1 - density of the top goes
    out = _ta("breadcrumbs", [base, delta], [1.0], density=[0.9], gamma=[0.2])
    assert ((out != 0).nonzero().squeeze(1) + 1).tolist() == list(range(1, 91))


def test_breadcrumbs_ties_combines_pruning_and_election():
    base, a, b = _family((30, 20), n=2)
    out = _ta("breadcrumbs_ties", [base, a, b], [1.0, 1.0], density=[0.9, 0.9], gamma=[0.01, 0.01])
    plain = _ta("breadcrumbs", [base, a, b], [1.0, 1.0], density=[0.9, 0.9], gamma=[0.01, 0.01])
    d = out - base
    # wherever both survive with opposite signs, only the elected one remains
    assert not torch.equal(out, plain)
    assert (d.abs() <= (a - base).abs() + (b - base).abs() + 1e-6).all()


# ---------------------------------------------------------------- sce, model_stock, nearswap, ...


def test_sce_formula():
    base, a, b, c = _family((10, 8), n=3)
    tv = torch.stack([a, b, c]) - base
    var = tv.var(dim=0, unbiased=False).flatten()
    k = int(var.count_nonzero() * 0.5)
    mask = torch.zeros_like(var)
    mask[var.topk(k).indices] = 1
    tv = tv * mask.view(10, 8)
    w = tv.square().mean(dim=(1, 2))
    w = w / w.sum() if w.sum() >= 1e-6 else torch.full((3,), 1 / 3)
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tv) == sign).float() * w.view(3, 1, 1)
    expected = base + (tv * agree).sum(0) / agree.sum(0).clamp(min=1e-6)
    out = merge_tensors("sce", [base, a, b, c], base_index=0, params={"select_topk": 0.5})
    torch.testing.assert_close(out, expected)


def test_model_stock_extremes():
    base = torch.zeros(2, 4)
    e = torch.eye(4)[:2]
    orth = [base, torch.cat([e[:1], torch.zeros(1, 4)]), torch.cat([torch.zeros(1, 4), e[1:]])]
    torch.testing.assert_close(merge_tensors("model_stock", orth, base_index=0), base)  # cos 0 -> t 0
    same = [base, base + 1, base + 1]
    torch.testing.assert_close(merge_tensors("model_stock", same, base_index=0), base + 1)  # cos 1 -> t 1


def test_model_stock_formula_and_filter_wise():
    ts = _family((6, 5), n=3)
    base, ws = ts[0], ts[1:]
    o = [(w - base).flatten() for w in ws]
    cos = torch.stack([torch.dot(o[i], o[j]) / (o[i].norm() * o[j].norm())
                       for i in range(3) for j in range(i + 1, 3)]).mean()
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(ws) / 3 + (1 - t) * base
    torch.testing.assert_close(merge_tensors("model_stock", ts, base_index=0), expected)
    rows = merge_tensors("model_stock", ts, base_index=0, params={"filter_wise": True})
    for r in range(6):
        row = merge_tensors("model_stock", [x[r] for x in ts], base_index=0)
        torch.testing.assert_close(rows[r], row)


def test_nearswap_formula():
    base, other = _family((8, 8), n=1)
    t = 0.001
    w = (t / (base - other).abs()).clamp(0, 1)
    out = merge_tensors("nearswap", [base, other], base_index=0, params={"t": t})
    torch.testing.assert_close(out, w * other + (1 - w) * base)
    big = merge_tensors("nearswap", [base, other], base_index=0, params={"t": 1.0})
    torch.testing.assert_close(big, other)


def test_arcee_fusion_takes_only_salient_changes():
    base = _rand(16, 16, scale=0.02)
    model = base + _rand(16, 16, seed=1, scale=1e-4)
    model[3, 5] += 1.0  # one large, salient change
    out = merge_tensors("arcee_fusion", [base, model], base_index=0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[3, 5], model[3, 5])
    changed = out != base
    scores = (model - base).abs() * (
        torch.softmax(model, -1) * torch.log(torch.softmax(model, -1) / torch.softmax(base, -1))
    ).sum(-1, keepdim=True)
    q = scores.flatten().sort().values
    n = q.numel()
    fence = q[int(0.5 * (n - 1))] + 1.5 * (q[int(0.75 * (n - 1))] - q[int(0.25 * (n - 1))])
    assert torch.equal(changed, scores >= fence)


def test_ram_unique_kept_shared_averaged():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([0.0, 4.0, 3.0, 0.0])
    out = merge_tensors("ram", [base, a, b], base_index=0)
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 3.0, 0.0]))
    plus = merge_tensors("ramplus_tl", [base, a, b], base_index=0, params={"r": 0.5, "alpha": 2.0})
    # rho: a has 1 shared / 1 unique, b 1 / 1 -> boost 1 + 0.5 * 1 on unique changes
    torch.testing.assert_close(plus, torch.tensor([1.5, 3.0, 4.5, 0.0]))


# ---------------------------------------------------------------- linear-time selection


@pytest.mark.parametrize("n", [1000, 140_000])  # the larger one takes the radix path
@pytest.mark.parametrize("kind", ["continuous", "ties", "signed"])
def test_rank_range_mask_matches_a_stable_sort(n, kind):
    x = _rand(n, seed=n)
    if kind == "ties":
        x = (x * 4).round().abs()
    elif kind == "continuous":
        x = x.abs()
    nonneg = kind != "signed"
    values, order = torch.sort(x, stable=True)
    for lo, hi in [(0, n // 3), (n // 5, n - n // 7), (10, 11), (0, n), (3, 3)]:
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[lo:hi]] = True
        assert torch.equal(_select.rank_range_mask(x, lo, hi, nonnegative=nonneg), expected)
    stats = _select.kth_smallest(x, [1, n // 4, n], nonnegative=nonneg)
    for r, s in zip([1, n // 4, n], stats):
        v = values[r - 1]
        assert (s.value, s.n_less, s.n_less_equal) == (v.item(), int((x < v).sum()), int((x <= v).sum()))


def test_top_k_mask_keeps_exactly_k_with_ties():
    x = (_rand(140_000, seed=4) * 3).round().abs()
    descending = x.sort(descending=True).values
    for k in (1, 1000, 70_000, 139_999):
        mask = _select.top_k_mask(x, k, nonnegative=True)
        assert mask.sum() == k
        v = descending[k - 1]
        assert (x[mask] >= v).all() and (x[~mask] <= v).all()


def test_fast_selection_agrees_with_mergekit_sort_without_ties(monkeypatch):
    ts = _family((40, 30), n=2)
    for method, extra in (("ties", {"density": [0.4, 0.7]}),
                          ("breadcrumbs_ties", {"density": [0.8, 0.6], "gamma": [0.05, 0.1]})):
        exact = _ta(method, ts, [1.0, 0.7], **extra)
        monkeypatch.setattr(_select, "EXACT_SELECTION_MAX_NUMEL", 0)
        fast = _ta(method, ts, [1.0, 0.7], **extra)
        monkeypatch.undo()
        assert torch.equal(exact, fast), method
    exact = merge_tensors("sce", ts, base_index=0, params={"select_topk": 0.3})
    monkeypatch.setattr(_select, "EXACT_SELECTION_MAX_NUMEL", 0)
    assert torch.equal(exact, merge_tensors("sce", ts, base_index=0, params={"select_topk": 0.3}))


def test_merge_inputs_are_plain_data():
    inp = MergeInputs(tensors=[torch.zeros(2)], base_index=0, model_params=[{}], params={})
    assert inp.base is inp.tensors[0]
