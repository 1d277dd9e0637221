"""Muon under torch.distributed: each matrix is orthogonalized by one rank of the job.

Two layouts, told apart per bucket:

- **Replicated** (plain tensors under DDP; ``distributed="auto"`` with an initialized process group
  of more than one rank): every rank keeps the full momentum (so a rank-0 ``state_dict()`` is a
  complete checkpoint), orthogonalizes only its own contiguous share of each bucket, and one
  all-gather per bucket hands every rank the whole result; all ranks then apply the same update to
  the same bits, so parameters stay bit-identical.
- **Sharded** (FSDP2 DTensors, ``Shard(0)`` on a 1-D mesh): momentum stays sharded like the
  parameter. Each rank steps its rows of every matrix through the same backend functions as a
  single process (momentum, update), on its *shard bucket*: the bucket's entries cut to the rank's
  rows (a split piece's rows on each rank: ``_entry_rows``), laid out row by row ("rows" layout,
  muon_kernels/bucket.py) in bucket order, which is owner order, so the momentum kernel writes
  straight into the all-to-all that sends each owner the rows of the matrices it orthogonalizes; a second all-to-all
  sends each rank back its rows of the result, in the same layout, for the update kernel.

The owner of each bucket entry comes from ``assign_owners``: contiguous ranges per bucket, the
remainder of an uneven split going to the ranks with the least work so far. It depends only on the
plan (shapes), so every rank computes the same assignment without talking. Collectives are issued
in bucket order on every rank, asynchronously: the next bucket's Newton–Schulz runs while the
previous bucket's collective is in flight, and each handle keeps its buffers alive until ``wait()``.
Before any of them, muon_kernels/rank_agreement.py checks that the ranks can step together.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import variants
from .bucket import Bucket, MatrixView, Variant, is_dtensor
from .rank_agreement import check_carries, check_same_plan
from .scalars import update_scalars

DISTRIBUTED_MODES = ("auto", "off")


def replicated_group(mode: str, process_group):
    """The group replicated (plain-tensor) buckets are split over, or None to compute locally."""
    if mode == "off" or not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def ranks_alone(mode: str) -> int:
    """How many ranks step their plain parameters each on its own: the world under "off" (1 otherwise,
    or without torch.distributed)."""
    if mode == "off" and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def check_process_group(mode: str, process_group) -> None:
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    if process_group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first, or leave process_group=None")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"process_group does not contain this rank (global rank {dist.get_rank()}): pass a group "
                         "this rank belongs to, or distributed='off' on ranks outside it")


def _shard_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of dim 0 per rank under Shard(0), torch.chunk's rule (FSDP2's)."""
    size = math.ceil(rows / world) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def _entry_rows(e, world: int) -> list[tuple[int, int]]:
    """[start, stop) per rank of an entry's rows (its own dim 0) under Shard(0): the parameter's
    rows; for a split piece of rows, their overlap with the piece in the piece's coordinates (a
    piece may span ranks, or miss one); a piece of columns keeps every rank's rows."""
    rows = _shard_rows(e.param.shape[0], world)
    if e.part is None or e.part[0] != 0:
        return rows
    _, start, size = e.part
    clip = lambda r: min(max(r, start), start + size) - start  # noqa: E731
    return [(clip(a), clip(b)) for a, b in rows]


def _entry_shape(e) -> tuple[int, ...]:
    """The entry's shape in its parameter's layout (a split piece's, or the parameter's)."""
    shape = list(e.param.shape)
    if e.part is not None:
        shape[e.part[0]] = e.part[2]
    return tuple(shape)


def bucket_layout(bucket: Bucket, names: dict[int, str], replicated) -> tuple[str, object]:
    """("sharded", mesh group) / ("replicated", group) / ("local", None); raises ValueError on a
    bucket that mixes meshes or DTensors with plain tensors, or a shard layout it cannot handle."""
    params = [e.param for e in bucket.entries]
    dt = [is_dtensor(p) for p in params]
    if not any(dt):
        return ("replicated", replicated) if replicated is not None else ("local", None)
    if not all(dt):
        p = params[dt.index(False)]
        raise ValueError(f"parameter {names[id(p)]} is a plain tensor in the same bucket as DTensor parameters; "
                         "shard every parameter of the model (fully_shard the root module too): a plain parameter "
                         "beside FSDP2 shards has gradients that no rank synchronizes")
    mesh = params[0].device_mesh
    for p in params:
        if p.device_mesh != mesh:
            raise ValueError(f"parameters {names[id(params[0])]} and {names[id(p)]} share a bucket but live on "
                             f"different device meshes ({mesh} vs {p.device_mesh}); Muon gathers a bucket over one "
                             "mesh: use one mesh for all Muon parameters")
        placements = tuple(p.placements)
        if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
            raise ValueError(f"parameter {names[id(p)]} has placements {placements} on a {mesh.ndim}-D mesh; only "
                             "Shard(0) on a 1-D mesh (FSDP2's fully_shard default) is supported, not Replicate/HSDP "
                             "or sharding on another dim")
        rows = p.shape[0] if p.ndim else 0
        start, stop = _shard_rows(rows, mesh.size())[mesh.get_local_rank()]
        if p.to_local().shape[0] != stop - start or tuple(p.to_local().shape[1:]) != tuple(p.shape[1:]):
            raise ValueError(f"parameter {names[id(p)]}: local shard {tuple(p.to_local().shape)} of {tuple(p.shape)} is "
                             "not torch.chunk's split of dim 0 over the mesh (uneven custom sharding is not supported)")
    return "sharded", mesh.get_group()


def assign_owners(buckets: list[Bucket], world: int) -> list[list[int]]:
    """Per bucket, the rank that orthogonalizes each entry: contiguous ranges in rank order, sizes
    differing by at most one, the larger ranges going to the ranks with the least work so far."""
    load = [0] * world
    owners = []
    for b in buckets:
        k = len(b.entries)
        base, extra = divmod(k, world)
        lucky = set(sorted(range(world), key=lambda r: (load[r], r))[:extra])
        counts = [base + (r in lucky) for r in range(world)]
        cost = b.m * b.m * b.n
        row = []
        for r, c in enumerate(counts):
            row += [r] * c
            load[r] += cost * sum(e.view.batch for e in b.entries[len(row) - c:len(row)])
        owners.append(row)
    return owners


class Placement(NamedTuple):
    """How one bucket is computed under torch.distributed."""

    kind: str  # "local", "replicated" or "sharded"
    group: object  # the process group it is split over (None: local)
    owners: list[int] | None  # the rank that orthogonalizes each entry
    shard: Bucket | None = None  # sharded: this rank's shard bucket (its rows of each entry)


def place(buckets: list[Bucket], names: dict[int, str], replicated, verify: list | None = None) -> list[Placement]:
    """Per bucket: how it is computed, over which group, which rank orthogonalizes each entry (ranks
    are assigned per group, in bucket order) and, for FSDP2 shards, this rank's shard bucket.
    ``verify`` (step only, never plan(), which one rank may call alone): each param group's settings
    (``settings.settings_key(group, portable=True)``), to check with one collective per group that
    every rank planned the same buckets with the same settings (``check_same_plan``)."""
    kinds = [bucket_layout(b, names, replicated) for b in buckets]
    for b, (kind, group) in zip(buckets, kinds):  # before any collective: each would fail on its own
        if kind != "local":
            check_carries(group, b.device, lambda b=b: names[id(b.entries[0].param)], sharded=kind == "sharded")
    placements = [Placement(kind, group, None) for kind, group in kinds]
    for group in dict.fromkeys(g for kind, g in kinds if kind != "local"):
        idx = [i for i, (kind, g) in enumerate(kinds) if kind != "local" and g is group]
        if verify is not None:
            check_same_plan(group, [buckets[i] for i in idx], verify, replicated=group is replicated)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        for i, owners in zip(idx, assign_owners([buckets[i] for i in idx], world)):
            shard = shard_bucket(buckets[i], world, rank) if kinds[i][0] == "sharded" else None
            placements[i] = Placement(kinds[i][0], group, owners, shard)
    return placements


def shard_bucket(bucket: Bucket, world: int, rank: int) -> Bucket:
    """This rank's rows of every entry of ``bucket``, as a bucket in the "rows" layout that the
    backends' momentum and update functions step like any other. The entries keep the bucket's
    order, which is also the order of their owners (``assign_owners`` gives contiguous ranges in
    rank order), so the momentum step writes them in the all-to-all's send order."""
    entries = []
    for e in bucket.entries:
        lo, hi = _entry_rows(e, world)[rank]
        first, stop = _shard_rows(e.param.shape[0], world)[rank]
        start = min(max(e.part[1] + lo - first, 0), stop - first) if e.part is not None and e.part[0] == 0 else 0
        v = e.view
        batched = v.kind in ("batch", "batch_transposed")  # dim 0 counts matrices, else rows
        view = MatrixView(hi - lo, v.rows, v.cols, v.kind) if batched else MatrixView(1, hi - lo, v.cols, v.kind)
        entries.append(replace(e, view=view, shard=(start, hi - lo), offset=lo * math.prod(_entry_shape(e)[1:])))
    return replace(bucket, entries=entries, cache={}, layout="rows")


def _matrix_ranges(bucket: Bucket, owners: list[int], world: int) -> list[tuple[int, int]]:
    """[start, stop) in the bucket's stack of matrices per rank (owners are contiguous)."""
    ranges, offset = [], 0
    for r in range(world):
        n = sum(e.view.batch for e, o in zip(bucket.entries, owners) if o == r)
        ranges.append((offset, offset + n))
        offset += n
    return ranges


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True)


def _wire_dtype(dtype: torch.dtype, group) -> torch.dtype:
    """gloo has no bf16/fp16 reductions or exchanges on every build; ship those as fp32 there."""
    if dist.get_backend(group) == "gloo" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


# -------------------------------------------------------------------------------------- replicated


def start_replicated(bucket: Bucket, owners: list[int], group, stack: torch.Tensor, max_workspace_bytes):
    """Orthogonalize this rank's share of ``stack``; start the all-gather of every share."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ranges = _matrix_ranges(bucket, owners, world)
    width = max(stop - start for start, stop in ranges)
    start, stop = ranges[rank]
    wire = _wire_dtype(bucket.ns_dtype, group)
    mine = torch.zeros((width, bucket.m, bucket.n), dtype=wire, device=stack.device)
    if stop > start:
        mine[: stop - start] = bucket.orthogonalize(stack[start:stop], max_workspace_bytes)
    gathered = torch.empty((world * width, bucket.m, bucket.n), dtype=wire, device=stack.device)
    work = _all_gather_into(gathered, mine, group)
    return work, (mine, gathered, ranges, width)


def finish_replicated(handle) -> torch.Tensor:
    work, (_, gathered, ranges, width) = handle
    work.wait()
    return torch.cat([gathered[r * width: r * width + (stop - start)] for r, (start, stop) in enumerate(ranges)])


# -------------------------------------------------------------------------------------- sharded


def start_sharded_gather(bucket: Bucket, placement: Placement, stack: torch.Tensor) -> tuple:
    """Start the all-to-all that brings each owner its matrices' rows. ``stack``: this rank's
    updates U from the shard bucket's momentum step, already in send order (by owner)."""
    group = placement.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    wire = _wire_dtype(bucket.dtype, group)
    send = stack if stack.dtype == wire else stack.to(wire)
    send_sizes = [0] * world
    for e, o in zip(placement.shard.entries, placement.owners):
        send_sizes[o] += e.view.numel
    recv_sizes = [0] * world
    for e, o in zip(bucket.entries, placement.owners):
        if o == rank:
            row_numel = math.prod(_entry_shape(e)[1:])
            for src, (a, b) in enumerate(_entry_rows(e, world)):
                recv_sizes[src] += (b - a) * row_numel
    recv = torch.empty(sum(recv_sizes), dtype=wire, device=bucket.device)
    work = dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                                  group=group, async_op=True)
    return work, (send, recv)


def _assemble(bucket: Bucket, owners: list[int], rank: int, world: int, recv: torch.Tensor) -> torch.Tensor:
    """The full updates of this rank's entries as a (k, m, n) stack (tall ones transposed)."""
    mine = [e for e, o in zip(bucket.entries, owners) if o == rank]
    pieces = {e_i: [None] * world for e_i in range(len(mine))}
    offset = 0
    for src in range(world):
        for i, e in enumerate(mine):
            a, b = _entry_rows(e, world)[src]
            n = (b - a) * math.prod(_entry_shape(e)[1:])
            pieces[i][src] = recv[offset:offset + n].reshape(b - a, *_entry_shape(e)[1:])
            offset += n
    views = []
    for i, e in enumerate(mine):
        full = torch.cat(pieces[i]).to(bucket.dtype).reshape(e.view.batch, e.view.rows, e.view.cols)
        views.append(full.mT if e.view.transposed else full)
    return torch.cat(views) if views else torch.empty((0, bucket.m, bucket.n), dtype=bucket.dtype,
                                                      device=bucket.device)


def start_sharded_scatter(bucket: Bucket, owners: list[int], group, gathered, max_workspace_bytes) -> tuple:
    """Orthogonalize this rank's matrices; start the all-to-all that returns each rank its rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    work, (_, recv) = gathered
    work.wait()
    stack = _assemble(bucket, owners, rank, world, recv)
    ortho = bucket.orthogonalize(stack, max_workspace_bytes) if stack.shape[0] else stack
    wire = _wire_dtype(bucket.ns_dtype, group)
    mine = [e for e, o in zip(bucket.entries, owners) if o == rank]
    fulls, offset = [], 0
    for e in mine:
        o = ortho[offset:offset + e.view.batch]
        offset += e.view.batch
        fulls.append((o.mT if e.view.transposed else o).reshape(_entry_shape(e)))
    send_parts, send_sizes = [], [0] * world
    for dest in range(world):
        for e, full in zip(mine, fulls):
            a, b = _entry_rows(e, world)[dest]
            send_parts.append(full[a:b].reshape(-1).to(wire))
            send_sizes[dest] += send_parts[-1].numel()
    recv_sizes = [0] * world  # from each owner, this rank's rows of its matrices: the shard bucket's order
    for e, o in zip(bucket.entries, owners):
        a, b = _entry_rows(e, world)[rank]
        recv_sizes[o] += (b - a) * math.prod(_entry_shape(e)[1:])
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=wire, device=bucket.device)
    out = torch.empty(sum(recv_sizes), dtype=wire, device=bucket.device)
    work = dist.all_to_all_single(out, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                                  group=group, async_op=True)
    return work, (send, out)


def finish_sharded(bucket: Bucket, placement: Placement, scattered, groups: list[dict], state) -> None:
    """Wait for this rank's rows of the result and apply them through the backend's update, as a
    single process does (with a variant, after one all-reduce of its per-neuron statistics)."""
    work, (_, out) = scattered
    work.wait()
    if bucket.variant.active:
        _finish_variant(bucket, placement, out, groups, state)
        return
    placement.shard.apply_update(out, groups, state)


def _finish_variant(bucket: Bucket, placement: Placement, out: torch.Tensor, groups: list[dict], state) -> None:
    """The variant update of FSDP2 shards (``Shard(0)``): each rank sums its rows' contributions to
    every neuron's q, Σ W·O and Σ W² (zeros elsewhere), one all-reduce makes the full-matrix
    statistics, and every rank then updates the same (replicated) v, applies g and s to its own rows
    through the backend's plain update, then the hyperball's c. ``out``: this rank's rows of O in
    the shard bucket's layout."""
    group = placement.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard, v = placement.shard, bucket.variant
    stats, places = [], []
    for i, e in enumerate(bucket.entries):
        local = shard.entries[i].target
        a, b = _entry_rows(e, world)[rank]
        count, on_cols = variants.neurons(e.view)
        full = torch.zeros(e.view.batch, count, 3, dtype=torch.float32, device=local.device)
        batched = e.view.kind in ("batch", "batch_transposed")
        # this rank's rows as (matrices, rows, cols) of the view, and where they sit in `full`
        shape = (b - a, e.view.rows, e.view.cols) if batched else (1, b - a, e.view.cols)
        target = full[a:b] if batched else (full if on_cols else full[:, a:b])
        places.append((a, b, batched, on_cols, shape))
        if local.numel():
            o = shard.slot(out, i).reshape(shape).to(torch.float32)
            w = local.reshape(shape).to(torch.float32)
            axis = 1 if on_cols else 2
            target += torch.stack([(o * o).sum(dim=axis), (w * o).sum(dim=axis), (w * w).sum(dim=axis)], dim=-1)
        stats.append(full)
    flat = torch.cat([t.reshape(-1) for t in stats])
    dist.all_reduce(flat, group=group)
    vs, radii = variants.state_tensors(bucket, state)
    sums, scales, offset = [], [], 0
    for i, (e, t) in enumerate(zip(bucket.entries, stats)):
        t = flat[offset: offset + t.numel()].view(t.shape)
        offset += t.numel()
        q, wo, w2 = t.unbind(-1)
        s = torch.ones_like(q)
        if v.normuon:
            state_v = vs[i].view(e.view.batch, -1)
            state_v.lerp_(q / (e.view.rows * e.view.cols // q.shape[1]), 1.0 - v.beta2)
            s = 1.0 / (state_v.sqrt() + v.normuon_eps)
        sums.append(torch.stack([q.sum(dim=1), (s * s * q).sum(dim=1), (s * wo).sum(dim=1), w2.sum(dim=1)], dim=1))
        scales.append(s)
    alphas = update_scalars(bucket, groups)[0]
    g, shrink = variants.gains(bucket, torch.cat(sums), alphas, radii)
    plain = shard.cache.get("plain")
    if plain is None:  # the shard bucket without the variant: the backend's plain decay + update
        plain = shard.cache["plain"] = replace(shard, variant=Variant(), cache={})
    o_eff = torch.zeros(shard.stack_shape, dtype=shard.entries[0].target.dtype, device=out.device)
    first, factors = 0, []
    for i, (e, s, (a, b, batched, on_cols, shape)) in enumerate(zip(bucket.entries, scales, places)):
        ks = slice(first + a, first + b) if batched else slice(first, first + 1)
        rows = slice(None) if batched or on_cols else slice(a, b)
        first += e.view.batch
        factors.append((ks, batched))
        local = shard.entries[i].target
        if local.numel():
            s = s[a:b] if batched else s[:, rows]
            factor = g[ks].view(-1, 1, 1) * (s.unsqueeze(1) if on_cols else s.unsqueeze(2))
            o = shard.slot(out, i).reshape(shape).to(torch.float32) * factor
            plain.slot(o_eff, i).copy_(o.reshape(local.shape))
    plain.apply_update(o_eff, groups, state)
    if shrink is not None:
        for i, (ks, batched) in enumerate(factors):
            local = shard.entries[i].target
            if local.numel():
                local.mul_(shrink[ks].view(-1, *[1] * (local.ndim - 1)) if batched else shrink[ks].reshape(()))
