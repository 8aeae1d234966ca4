"""Interpolation on the sphere: slerp, nuslerp, multislerp and karcher.

Each treats a weight tensor (or each of its rows/columns) as a point in a
high-dimensional space, interpolates its direction along the sphere and its
length linearly. Each method computes in the precision mergekit uses for it
(slerp in float32, the others in the inputs' dtype), so that half-precision
merges round the same way.
"""
from __future__ import annotations

import math

from ray_merge.errors import UserError
from ray_merge.methods._common import base_and_others, exactly, work_dtype
from ray_merge.methods._deferred import deferred
from ray_merge.methods._select import CHUNK
from ray_merge.methods.base import MergeInputs, Param, merge_method

torch = deferred("torch")

_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8


def slerp_coefficients(t: float, cos_theta: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1) = c0*v0 + c1*v1 for unit-angle cos_theta.

    Nearly parallel or antiparallel pairs use linear interpolation.
    """
    if abs(cos_theta) > _SLERP_DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@merge_method(
    "slerp",
    params=[Param("t", min=0.0, max=1.0, help="interpolation factor: 0 gives the base model, 1 the other")],
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    description="spherical linear interpolation between the base and one other model",
    extra={"workspace_tensors": 4, "workspace_per_input": 0},
)
def slerp(inp: MergeInputs) -> torch.Tensor:
    """SLERP: move from the base (t=0) towards the other model (t=1) along the
    great circle through both flattened tensors, at constant angular speed."""
    base, others, _ = base_and_others(inp, "slerp")
    exactly(1, others, "slerp")
    t = float(inp.params["t"])
    dtype = work_dtype(base)
    x0, x1 = base.reshape(-1), others[0].reshape(-1)
    n = x0.numel()
    if n == 0:
        return base.clone()
    # Two passes over cache-sized chunks, widened to float32 one chunk at a time:
    # the sums of squares and the dot product, then the interpolation.
    size = min(CHUNK, n)
    a, b = torch.empty(size, dtype=dtype), torch.empty(size, dtype=dtype)
    sq0 = sq1 = dot = 0.0
    for start in range(0, n, size):
        stop = min(start + size, n)
        v0, v1 = a[: stop - start].copy_(x0[start:stop]), b[: stop - start].copy_(x1[start:stop])
        sq0 += float(torch.dot(v0, v0))
        sq1 += float(torch.dot(v1, v1))
        dot += float(torch.dot(v0, v1))
    # A (near-)zero tensor has no direction: measure the angle unnormalised.
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    n0 = n0 if n0 > _SLERP_EPS else 1.0
    n1 = n1 if n1 > _SLERP_EPS else 1.0
    cos_theta = min(1.0, max(-1.0, dot / (n0 * n1)))
    c0, c1 = slerp_coefficients(t, cos_theta)
    out = torch.empty(n, dtype=base.dtype)
    for start in range(0, n, size):
        stop = min(start + size, n)
        v0, v1 = a[: stop - start].copy_(x0[start:stop]), b[: stop - start].copy_(x1[start:stop])
        out[start:stop] = v0.mul_(c0).add_(v1, alpha=c1)
    return out.view(base.shape)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


@merge_method(
    "nuslerp",
    params=[
        Param("weight", per_model=True, non_base=True,
              help="relative weight; t = w2 / (w1 + w2)"),
        Param("nuslerp_flatten", True, kind=bool,
              help="interpolate the whole tensor as one vector"),
        Param("nuslerp_row_wise", False, kind=bool,
              help="without flattening, interpolate vectors along the first dimension "
              "instead of the last"),
    ],
    base_model="optional",
    min_non_base=2,
    max_non_base=2,
    pretty_name="NuSLERP",
    description="slerp of two models (or of their task vectors) with weight-derived t",
    extra={"workspace_tensors": 8, "workspace_per_input": 0},
)
def nuslerp(inp: MergeInputs) -> torch.Tensor:
    """NuSLERP: slerp between exactly two models at t = w1 / (w0 + w1).

    With a base model it interpolates their task vectors instead and adds the
    result to the base. ``nuslerp_flatten`` (default) treats the whole tensor as
    one vector; otherwise each vector along the last dimension, or along the
    first with ``nuslerp_row_wise``, is interpolated on its own. Collinear
    vectors are interpolated linearly.
    """
    base, others, model_params = base_and_others(inp, "nuslerp", required=False)
    exactly(2, others, "nuslerp")
    w0, w1 = (float(p["weight"]) for p in model_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    v0, v1 = others
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    dim = None
    if inp.params["nuslerp_flatten"]:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    else:
        dim = 0 if inp.params["nuslerp_row_wise"] else -1
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    # Per-vector angle, in the inputs' precision as mergekit computes it.
    cos = (_unit_rows(v0) * _unit_rows(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _SLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    arc = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, arc)
    out = out.reshape(shape) if dim is None else out.transpose(dim, -1).contiguous()
    if base is not None:
        out = out + base
    return out


@merge_method(
    "multislerp",
    params=[
        Param("weight", per_model=True, non_base=True, help="relative weight of this model"),
        Param("normalize_weights", True, kind=bool, help="divide weights by their sum"),
        Param("eps", 1e-8, min=0.0, help="numerical-stability constant"),
    ],
    base_model="optional",
    min_non_base=1,
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="barycentric interpolation of any number of models on the sphere",
    extra={"workspace_tensors": 3, "workspace_per_input": 3},
)
def multislerp(inp: MergeInputs) -> torch.Tensor:
    """Multi-SLERP: a weighted barycentre of several models on the sphere.

    1. Put each (task) vector on the unit sphere, remembering its norm.
    2. Take the weighted mean direction, the point of tangency.
    3. Project the unit vectors onto the tangent space there and average them.
    4. Map the average back to the sphere (exponential map) and give it the
       weighted mean norm.
    With a base model this happens in task-vector space. Two antipodal inputs of
    equal weight fall back to linear interpolation; more than two whose weighted
    directions cancel out are an error. Arithmetic is in the inputs' precision.
    """
    base, others, model_params = base_and_others(inp, "multislerp", required=False)
    if not others:
        raise UserError("merge method multislerp needs at least one non-base model")
    if len(others) == 1:
        return others[0]
    eps = float(inp.params["eps"])
    shape = others[0].shape
    vectors = torch.stack([x.reshape(-1) for x in others])
    if base is not None:
        vectors.sub_(base.reshape(-1))
    weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=vectors.dtype)
    if inp.params["normalize_weights"]:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)

    # 1. project to the unit sphere
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    # 2. mean direction
    mean = (units * column).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise UserError(
                "multislerp: the weighted input directions cancel out (e.g. vectors a and -a "
                "with equal weights); use different weights"
            )
        out = vectors[0] * weights[0] + vectors[1] * weights[1]
    else:
        mean = mean / mean_norm
        # 3. tangent space at the mean, weighted average there
        tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
        del units
        tangent = (tangents * column).sum(dim=0)
        del tangents
        # 4. exponential map back to the sphere, at the weighted mean norm
        step = torch.linalg.vector_norm(tangent) + eps
        out = mean * torch.cos(step) + tangent * (torch.sin(step) / step)
        out = out * (norms.squeeze(-1) * weights).sum()
    out = out.view(shape)
    if base is not None:
        out = out + base
    return out


@merge_method(
    "karcher",
    params=[
        Param("max_iter", 10, kind=int, min=0, help="maximum gradient steps"),
        Param("tol", 1e-5, min=0.0, help="convergence tolerance"),
    ],
    base_model="none",
    pretty_name="Karcher Mean",
    reference_url="https://arxiv.org/abs/2603.04972",
    description="Riemannian (Karcher) mean of the models on the sphere",
    extra={"workspace_tensors": 4, "workspace_per_input": 1},
)
def karcher(inp: MergeInputs) -> torch.Tensor:
    """Karcher mean: the point on the sphere minimising the summed squared
    geodesic distance to the (equally weighted) input directions, found by
    Riemannian gradient descent (at most ``max_iter`` steps, stopping when the
    step is below ``tol``), scaled by the mean input norm. Every input counts,
    the base model too if one is listed; inputs with norm <= tol give no
    direction. Directions are kept in the inputs' precision, norms in float32.
    """
    tensors = inp.tensors
    if len(tensors) == 1:
        return tensors[0]
    max_iter = int(inp.params["max_iter"])
    tol = float(inp.params["tol"])
    dtype = tensors[0].dtype
    norm_dtype = work_dtype(tensors[0])
    alpha = 1.0 / len(tensors)

    def norm(x):
        return torch.linalg.vector_norm(x.to(norm_dtype))

    norms = [norm(t) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [(tensors[i] / norms[i]).to(dtype).reshape(-1) for i in valid]
    weights = [1.0 / len(valid)] * len(valid)

    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mean_norm = norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        # Log map of each input at the mean: theta/sin(theta) * (u - cos(theta) m).
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)
        step = norm(tangent)
        if step.item() < tol:
            break
        # Exponential map: walk the geodesic, then renormalise.
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(dtype)
        length = norm(mean)
        if length.item() > tol:
            mean = (mean / length).to(dtype)
    scale = sum(alpha * n for n in norms)
    return (scale * mean).view(tensors[0].shape)

