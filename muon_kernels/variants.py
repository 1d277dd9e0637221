"""What happens to the orthogonalized update O before it is applied: NorMuon and the hyperball.

**NorMuon** (``adaptive="normuon"``; Li et al. 2025, arXiv 2510.05491, following the authors'
reference ``normuon.py``): per output neuron i (a row of the (out, in) matrix; a column of a weight
stored (in, out)), in fp32,

    v_i ← lerp(v_i, mean_j O_ij², 1 - β2)          (state "normuon_v", no bias correction)
    O'  = O ⊙ s,  s_i = 1 / (√v_i + ε)
    O'' = O' · ‖O‖_F / (‖O'‖_F + ε)                 (back to O's Frobenius norm)

then the usual ``W -= lr·scale·O''``. modded-nanogpt keeps the statistic along the larger dimension
instead (per column of a wide matrix); we follow the paper's neuron-wise choice.

**Hyperball** (``constraint="hyperball"``; Wen et al. 2025, MuonH; NVIDIA Emerging-Optimizers'
``MuonHyperball``): each matrix stays on the sphere of its initial Frobenius norm R (state
"hyperball_radius", recorded at its first step):

    W ← R · normalize(W − lr · R · normalize(O))

per matrix of the view (per expert of a 3D stack). normalize(scale·O) = normalize(O), so the lr
scale (``adjust_lr_fn``) drops out; weight decay must be 0 (the sphere fixes ‖W‖_F).

Every backend computes, per neuron, q_i = Σ_j O_ij² (and for the hyperball Σ_j W_ij·O_ij,
Σ_j W_ij²), updates v and s on the way, and reduces them per matrix to four sums — Σq, Σs²q,
Σs·(W·O), ΣW² — from which ``gains`` derives two scalars per matrix: g (O_eff = g·s⊙O) and, for
the hyperball, c (W ← c·(W + α·O_eff)), using ‖W + αO_eff‖² = ΣW² + 2αg·Σs(W·O) + α²g²·Σs²q.
So the update stays one fused pass, and a step reads nothing back to the host.
"""

from __future__ import annotations

import torch

from .bucket import Bucket, MatrixView, Variant
from .real_number import is_real

ADAPTIVE_MODES = ("none", "normuon")
CONSTRAINTS = ("none", "hyperball")
# Group keys of the variants and their defaults (also ``Muon(...)`` keyword-only arguments).
DEFAULTS = {"adaptive": "none", "normuon_beta2": 0.95, "normuon_eps": 1e-10, "constraint": "none",
            "hyperball_eps": 1e-8}
# Keys whose saved value must equal the optimizer's when a state_dict is loaded (a checkpoint from
# before a key existed was saved with the first value).
CHECKPOINT_NAMES = {"adaptive": "none", "constraint": "none", "weight_decay_mode": "decoupled"}


def variant(group: dict) -> Variant:
    if group["adaptive"] == "none" and group["constraint"] == "none":
        return Variant()
    return Variant(group["adaptive"] == "normuon", float(group["normuon_beta2"]), float(group["normuon_eps"]),
                   group["constraint"] == "hyperball", float(group["hyperball_eps"]))


def check_settings(group: dict) -> None:
    if group["adaptive"] not in ADAPTIVE_MODES:
        raise ValueError(f"adaptive must be one of {ADAPTIVE_MODES}, got {group['adaptive']!r}")
    beta2 = group["normuon_beta2"]
    if not (is_real(beta2) and 0.0 <= beta2 < 1.0):
        raise ValueError(f"normuon_beta2 must be a float in [0, 1), got {beta2!r}")
    for key in ("normuon_eps", "hyperball_eps"):
        if not (is_real(group[key]) and group[key] > 0.0):
            raise ValueError(f"{key} must be a float > 0, got {group[key]!r}")
    if group["constraint"] not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {group['constraint']!r}")
    if group["constraint"] == "hyperball" and group["weight_decay"] != 0.0:
        raise ValueError(f"constraint='hyperball' keeps ‖W‖_F fixed, so weight decay would do nothing but change the "
                         f"step size; pass weight_decay=0 (got {group['weight_decay']}; it defaults to 0.1, as "
                         "torch.optim.Muon's)")
    if group["constraint"] == "hyperball" and group["weight_decay_mode"] != "decoupled":
        raise ValueError("constraint='hyperball' has no weight decay: leave weight_decay_mode='decoupled'")


def check_checkpoint(saved: dict, current: dict) -> None:
    """A checkpoint's variant names must match this optimizer's: its state (NorMuon's v, the radii)
    means nothing under other settings, and silently switching variants would change training."""
    for key, before in CHECKPOINT_NAMES.items():
        value = saved.get(key, before)
        if value != current[key]:
            raise ValueError(f"it was saved with {key}={value!r} but this optimizer has {key}={current[key]!r}; "
                             f"construct the optimizer with {key}={value!r} to resume it (or load only the model "
                             "weights to switch variants)")


# ------------------------------------------------------------------------------------ layout


def neurons(view: MatrixView) -> tuple[int, bool]:
    """(neurons per matrix, whether they are the view's columns): one per output row of the (out, in)
    matrix; a weight stored (in, out) has them along its columns."""
    stored_transposed = view.kind in ("transposed", "batch_transposed")
    return (view.cols, True) if stored_transposed else (view.rows, False)


def on_oriented_columns(view: MatrixView) -> bool:
    """Whether the neurons run along the columns of the oriented (m <= n) matrix in the stack."""
    # Not `on_columns != view.transposed`: traced by torch.compile with dynamic shapes, transposed
    # is a SymBool, and torch 2.11 fails comparing a bool with one ("BooleanAtom not allowed").
    return (not view.transposed) if neurons(view)[1] else view.transposed


def state_shape(view: MatrixView) -> tuple[int, ...]:
    """normuon_v: (batch, neurons) for expert stacks, (neurons,) otherwise; radius: (batch,) or ()."""
    count = neurons(view)[0]
    return (view.batch, count) if view.kind in ("batch", "batch_transposed") else (count,)


def expected_state_shapes(view: MatrixView, part=None, p: torch.Tensor | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of the variants' state for a parameter viewed as ``view``: NorMuon's v (a split
    piece's v is a slice of its parameter's, one per row of ``p``) and the hyperball radius."""
    v = state_shape(view) if part is None else (p.shape[part[0]],)
    return {"normuon_v": v, "hyperball_radius": state_shape(view)[:-1]}


def frobenius_norms(p: torch.Tensor, view: MatrixView) -> torch.Tensor:
    """fp32 (fp64 for fp64) Frobenius norm of each matrix of the view, two-stage (accurate)."""
    acc = torch.promote_types(p.dtype, torch.float32)
    if hasattr(p, "full_tensor"):  # an FSDP2 shard: the radius is the whole matrix's (one gather, first step)
        p = p.full_tensor()
    mats = p.detach().reshape(view.batch, view.rows, view.cols)
    return torch.linalg.vector_norm(torch.linalg.vector_norm(mats, dim=-1, dtype=acc), dim=-1)


def init_state(entries, state, names: dict[int, str]) -> None:
    """``entries``: (param, view, variant, split piece or None). Create NorMuon's v (zeros) and
    record hyperball radii for parameters stepping for the first
    time. Every radius is checked before any is stored: a matrix of norm 0, NaN or inf raises ValueError and
    leaves the state as it was (one host read, on the first step only)."""
    vs, radii = {}, {}
    for p, view, v, part in entries:
        st = state.get(p, {})
        if v.normuon and "normuon_v" not in st:
            vs[p] = expected_state_shapes(view, part, p)["normuon_v"]
        if v.hyperball and "hyperball_radius" not in st:
            radii[p] = (frobenius_norms(p, view), view, names[id(p)])
    for p, (norms, view, name) in radii.items():
        usable = (norms > 0) & torch.isfinite(norms)
        if not bool(usable.all()):
            norm = norms[~usable][0].item()  # boolean indexing: a flat tensor
            raise ValueError(f"parameter {name}: constraint='hyperball' keeps each matrix on the sphere of its initial "
                             f"Frobenius norm, but a matrix of it has norm {norm}; initialize it (e.g. nn.init) so that "
                             "every matrix has a finite, nonzero norm before the first step or put it in a group "
                             "with constraint='none'")
    for p, shape in vs.items():
        state[p]["normuon_v"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
    for p, (norms, view, _) in radii.items():
        state[p]["hyperball_radius"] = norms.to(torch.float32).reshape(expected_state_shapes(view)["hyperball_radius"])


def state_tensors(bucket: Bucket, state) -> tuple[list, list]:
    """(normuon_v per entry, hyperball_radius per entry); empty lists for a variant that is off."""
    vs = [neuron_piece(e, state[e.param]["normuon_v"]) for e in bucket.entries] if bucket.variant.normuon else []
    radii = [state[e.param]["hyperball_radius"] for e in bucket.entries] if bucket.variant.hyperball else []
    return vs, radii


def neuron_piece(e, v: torch.Tensor) -> torch.Tensor:
    """A split piece's neurons of the parameter's v (the piece cuts the output axis, so a slice)."""
    return v if e.part is None else v.narrow(0, e.part[1], e.part[2])


def table_views(bucket: Bucket) -> list[tuple]:
    """Per entry: (batch, rows, cols, transposed, neurons on columns, neurons per matrix)."""
    return [(e.view.batch, e.view.rows, e.view.cols, e.view.transposed, *reversed(neurons(e.view)))
            for e in bucket.entries]


# int64 per matrix in ``matrix_table`` (the compiled extension's kVariantTableColumns must agree).
TABLE_COLUMNS = 7


def matrix_table(params, vs, views) -> tuple[int, ...]:
    """The statistics kernels' per-matrix table (Triton and CUDA read the same one), 7 int64 per
    matrix: parameter address of the matrix, its NorMuon v address (0 without ``vs``), rows, cols,
    transposed in the stack, neurons on the view's columns, and the parameter's row stride: its cols,
    or a wider matrix's where it is a column slice (the fused backends take contiguous tensors and 2D
    ones with unit column stride)."""
    values = []
    for i, (p, (batch, rows, cols, transposed, neuron_cols, count)) in enumerate(zip(params, views)):
        ld = p.stride(0) if p.ndim == 2 and rows > 1 else cols
        for b in range(batch):
            values += [p.data_ptr() + b * rows * cols * p.element_size(),
                       vs[i].data_ptr() + b * count * 4 if vs else 0, rows, cols, int(transposed), int(neuron_cols),
                       ld]
    return tuple(values)


def statistics_table(bucket: Bucket, params, vs) -> tuple[int, ...]:
    """``matrix_table`` of the bucket, built again only when a parameter or state tensor moved (the
    table holds their addresses; the rest depends on the plan alone)."""
    key = tuple(t.data_ptr() for t in (*params, *vs))
    cached = bucket.cache.get("statistics_table")
    if cached is None or cached[0] != key:
        cached = bucket.cache["statistics_table"] = (key, matrix_table(params, vs, table_views(bucket)))
    return cached[1]


# ------------------------------------------------------------------------------------ math


def per_matrix(bucket: Bucket, values: torch.Tensor) -> torch.Tensor:
    """Per-entry values (K_entries,) repeated for each matrix of the entry (device op, no sync)."""
    counts = [e.view.batch for e in bucket.entries]
    if all(c == 1 for c in counts):
        return values
    key = ("matrix_counts", tuple(counts))
    if key not in bucket.cache:
        bucket.cache[key] = torch.tensor(counts, device=bucket.device)
    return torch.repeat_interleave(values, bucket.cache[key], output_size=bucket.matrices)


def radius_vector(bucket: Bucket, radii: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bucket's hyperball radii as one (matrices,) vector in ``dtype``, concatenated once and
    reused while every entry's radius is the same tensor at the same version: radii are recorded at
    a parameter's first step and replaced only by ``load_state_dict`` (which rebuilds the plan), so
    a step launches no cat for them. Inside a CUDA-graph capture the cat is captured as before, so a
    replay reads the radius tensors themselves."""
    capturing = bucket.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stamp = None if capturing else _version_stamp(radii)
    cached = bucket.cache.get(("radii", dtype))
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[2]
    vec = torch.cat([r.reshape(-1) for r in radii]).to(dtype)
    if stamp is not None:  # the radii themselves are kept, so no id in the stamp can be reused
        bucket.cache[("radii", dtype)] = (stamp, list(radii), vec)
    return vec


def _version_stamp(radii: list[torch.Tensor]) -> list[tuple[int, int]] | None:
    """(id, version) of each radius, or None where one keeps no version counter (an inference
    tensor): no reuse then. A function of its own, a plain loop: under torch 2.11's Dynamo on Python
    3.12 (the GPU machine's), the comprehension inside ``radius_vector``'s ``try`` could not be
    resumed after its graph break (InternalTorchDynamoError: KeyError: stamp), so no compiled
    hyperball step ran there."""
    stamp = []
    for r in radii:
        try:
            stamp.append((id(r), r._version))
        except RuntimeError:
            return None
    return stamp


def gains(bucket: Bucket, sums: torch.Tensor, alphas: torch.Tensor | None,
          radii: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From the per-matrix sums (K, 4): g (O_eff = g·s⊙O) and, for the hyperball, c (W ← c·(W + α·O_eff)),
    fp32 on the device. Combined in fp64: the sums are fp32-accurate, the hyperball's ‖W'‖² subtracts."""
    v = bucket.variant
    s_q, s_sq, s_swo, s_w2 = sums.to(torch.float64).unbind(-1)
    ratio = s_q.sqrt() / (s_sq.sqrt() + v.normuon_eps) if v.normuon else torch.ones_like(s_q)
    if not v.hyperball:
        return ratio.to(torch.float32), None
    radius = radius_vector(bucket, radii, torch.float64)
    g = ratio * radius / (ratio * s_sq.sqrt()).clamp_min(v.hyperball_eps)
    ag = per_matrix(bucket, alphas).to(torch.float64) * g
    norm = (s_w2 + 2 * ag * s_swo + ag * ag * s_sq).clamp_min(0).sqrt()
    # A step that moves nothing (lr = 0: a scheduler's first step, DCP's state-initializing step)
    # leaves W exactly as it is, instead of re-projecting it with a factor a few ulps from 1.
    shrink = torch.where(ag == 0, 1.0, radius / norm.clamp_min(v.hyperball_eps))
    return g.to(torch.float32), shrink.to(torch.float32)


def torch_statistics(bucket: Bucket, ortho: torch.Tensor, vs: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
    """Torch reference of the statistics pass: updates each entry's v in place; returns (s per entry
    as (batch, neurons) fp32, or None without NorMuon; the (K, 4) sums)."""
    v = bucket.variant
    scales, sums, offset = [], [], 0
    for i, e in enumerate(bucket.entries):
        o = ortho[offset: offset + e.view.batch].to(torch.float32)
        offset += e.view.batch
        axis = 1 if on_oriented_columns(e.view) else 2  # reduce over the other axis
        q = (o * o).sum(dim=axis)  # (batch, neurons)
        s = None
        if v.normuon:
            state_v = vs[i].view(e.view.batch, -1)
            state_v.lerp_(q / o.shape[axis], 1.0 - v.beta2)
            s = 1.0 / (state_v.sqrt() + v.normuon_eps)
        ss = torch.ones_like(q) if s is None else s
        s_swo = s_w2 = torch.zeros(e.view.batch, device=q.device)
        if v.hyperball:
            w = oriented(e.target, e.view).to(torch.float32)
            s_swo = (ss * (w * o).sum(dim=axis)).sum(dim=1)
            s_w2 = (w * w).sum(dim=(1, 2))
        sums.append(torch.stack([q.sum(dim=1), (ss * ss * q).sum(dim=1), s_swo, s_w2], dim=1))
        scales.append(s)
    return scales, torch.cat(sums)


def oriented(p: torch.Tensor, view: MatrixView) -> torch.Tensor:
    """The parameter as the (batch, m, n) oriented matrices of the stack (a view where possible)."""
    mats = p.reshape(view.batch, view.rows, view.cols)
    return mats.mT if view.transposed else mats


def effective_update(bucket: Bucket, ortho: torch.Tensor, scales: list, g: torch.Tensor) -> torch.Tensor:
    """O_eff = g·s⊙O per matrix, fp32, (K, m, n) oriented."""
    out = ortho.to(torch.float32) * g.view(-1, 1, 1)
    offset = 0
    for e, s in zip(bucket.entries, scales):
        if s is not None:
            part = out[offset: offset + e.view.batch]
            part.mul_(s.unsqueeze(1) if on_oriented_columns(e.view) else s.unsqueeze(2))
        offset += e.view.batch
    return out

