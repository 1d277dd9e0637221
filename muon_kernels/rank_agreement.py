"""Whether the ranks of a process group can step together, checked before their collectives: the
group has a backend for the parameters' devices (``check_carries``), the ranks planned the same
buckets with the same settings and hold the same gradients where they replicate them
(``check_same_plan``, when a plan is built), and every step, that a Muon gradient exists on all
ranks or on none and the settings still agree (``check_grad_agreement``). Each check is one small
all-reduce of digests (a second one only to name the culprit), and raises the same error on every
rank, so no rank is left waiting in a collective the others never issue. Used by
muon_kernels/distributed.py (plans) and muon_kernels/settings.py (each step).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .bucket import Bucket, is_dtensor


def _serves(group, device: torch.device) -> bool:
    """Whether ``group`` has a backend for ``device``'s tensors (asked of the group, not read from its
    name: "cuda:nccl" is not "nccl")."""
    try:
        (group if group is not None else dist.group.WORLD)._get_backend(device)
    except RuntimeError:  # "No backend type associated with device type cpu"
        return False
    return True


def check_carries(group, device: torch.device, name_of, sharded: bool) -> None:
    """ValueError where ``group`` has no backend for ``device``, whose tensors Muon's collectives
    carry (``name_of()``: a parameter there, named only for the error): parameters on the host
    (FSDP2's CPU offload) over NCCL alone. Raised before the first collective, on every rank alike."""
    if not _serves(group, device):
        fix = ("init_process_group('cpu:gloo,cuda:nccl') gives a group both (FSDP2 with CPU offload steps on the "
               "host)" if sharded else "pass a process_group that has one, or distributed='off' where every rank "
               "should step its own parameters")
        raise ValueError(f"parameter {name_of()} is on {device}, but its process group's backend "
                         f"({dist.get_backend(group)}) has none for {device.type} tensors, which Muon's "
                         f"collectives carry: {fix}; nothing was modified")


_PLAIN_HINT = ("parameters differ across ranks: distributed='auto' treats plain parameters as replicated (DDP); for "
               "per-rank models (pipeline stages) pass distributed='off'")
_MESH_HINT = "the sharded Muon parameters differ across the ranks of their mesh"
_SETTINGS_HINT = ("the Muon settings of the same parameters differ across ranks (lr, weight_decay, momentum, "
                  "Newton–Schulz, momentum precision, variants, splits or backend): every rank must build the "
                  "optimizer and change its param_groups alike, or each matrix is stepped with its owner's")
_GRADS_TOLERANCE = 1e-9  # relative: all-reduced gradients agree bit for bit; per-rank models by O(1)


def check_same_plan(group, buckets: list[Bucket], group_settings: list, *, replicated: bool) -> None:
    """One all-reduce when the plan is (re)built: every rank must have planned the same buckets with
    the same settings, or their collectives would not match (or, where only settings differ, each
    matrix would be stepped with its owner's). For replicated buckets also the gradients: the
    premise of orthogonalizing each matrix on one rank for all is that every rank holds the same
    (all-reduced) gradients, and per-rank models of the same shapes (identical pipeline stages)
    plan the same buckets but do not. ``group_settings``: per param group, its settings key."""
    used = sorted({e.group for b in buckets for e in b.entries})
    values = [_digest([(gi, group_settings[gi]) for gi in used]),
              _digest([(len(b.entries), b.m, b.n, b.matrices, b.dtype.itemsize) for b in buckets])]
    device = _device(group, buckets)
    # the digests first: a fixed-length collective, so ranks that planned different buckets still match
    hi, lo = _spread(group, torch.tensor(values, dtype=torch.float64, device=device))
    if hi[0] != lo[0]:
        raise RuntimeError(f"ranks planned different Muon settings: {_SETTINGS_HINT}")
    if hi[1] != lo[1]:
        raise RuntimeError(f"ranks planned different Muon buckets: {_PLAIN_HINT if replicated else _MESH_HINT}")
    plain = [b for b in buckets if not is_dtensor(b.entries[0].param)]  # (a shard's gradient is its own)
    if not plain:
        return
    hi, lo = _spread(group, _gradient_sums(plain).to(device))
    # both sums measured against the absolute one: a signed sum near zero must not count as far apart
    scale = torch.maximum(hi[1::2].abs(), lo[1::2].abs()).repeat_interleave(2)
    far = (hi - lo).abs() > _GRADS_TOLERANCE * scale
    if far.any():
        b = plain[int(far.nonzero()[0, 0]) // 2]
        raise RuntimeError(f"the gradients of the replicated Muon parameters differ across ranks (bucket of "
                           f"{b.matrices} matrices {b.m}×{b.n}): {_PLAIN_HINT}, or process_group= the ranks that "
                           "replicate them")


def _digest(value) -> int:
    """52 bits of a hash of ``repr(value)`` that every process computes alike (Python salts str
    hashes per process) and a float64 carries exactly."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") % 2**52


def _gradient_sums(buckets: list[Bucket]) -> torch.Tensor:
    """Per bucket, the fp64 sum and absolute sum of its parameters' gradients (float64 (2·buckets,),
    on the host: a DDP module's parameters may span devices)."""
    sums = []
    for b in buckets:
        grads = [p.grad for p in dict.fromkeys(e.param for e in b.entries)]
        sums += [sum(g.sum(dtype=torch.float64).cpu() for g in grads),
                 sum(torch.linalg.vector_norm(g, 1, dtype=torch.float64).cpu() for g in grads)]
    return torch.stack(sums)


def _spread(group, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MAX all-reduce of (v, -v): each value's largest and smallest across the ranks (on the host)."""
    both = torch.cat([values, -values])
    dist.all_reduce(both, group=group, op=dist.ReduceOp.MAX)
    both = both.cpu()
    return both[:len(values)], -both[len(values):]


def control_device(group, device: torch.device) -> torch.device:
    """Where a small control tensor for ``group`` lives: the host where the group has a backend for
    CPU tensors (gloo, torch's default "cpu:gloo,cuda:nccl" pair), else ``device`` (NCCL alone, named
    "nccl" or "cuda:nccl", or another accelerator's backend: none takes a CPU tensor)."""
    cpu = torch.device("cpu")
    return cpu if _serves(group, cpu) else device


def _device(group, items) -> torch.device:
    """``control_device`` for ``items`` (tensors or buckets, all on one device)."""
    return control_device(group, items[0].device)


def check_grad_agreement(group, params: list[torch.Tensor], names, settings: list[tuple[int, tuple]],
                         setting_names: tuple[str, ...], *, rebuild: bool, replicated: bool) -> bool:
    """One small all-reduce per step over the ranks of ``group``: a parameter must have a gradient on
    every rank or on none, else the ranks would issue different collectives and hang; the ranks'
    Muon settings (``settings``: (group index, portable settings key) per param group, the key's
    entries named by ``setting_names``) must agree, or each matrix would be stepped with its owner's
    (or, where a setting changes the plan, one rank would rebuild it alone); returns whether any
    rank rebuilds its plan (``rebuild``: this rank's decision). A second all-reduce only to name the
    culprit; raises the same error on every rank. ``names()``: each parameter's label by id."""
    if rebuild:  # devices are in the plan key: checked where this rank's plan changes, not every step
        for device in dict.fromkeys(p.device for p in params):
            check_carries(group, device, lambda d=device: names()[id(next(p for p in params if p.device == d))],
                          not replicated)
    flags = [p.grad is not None for p in params]
    device = _device(group, params)
    indices = [gi for gi, _ in settings]
    hi, lo = _spread(group, torch.tensor([len(params), _digest(flags), _digest(indices), _digest(settings),
                                          float(rebuild)], dtype=torch.float64, device=device))
    count_differs, flags_differ, groups_differ, settings_differ, _ = (hi != lo).tolist()
    if count_differs:
        raise RuntimeError(f"ranks hold different numbers of Muon parameters: {_PLAIN_HINT if replicated else _MESH_HINT}")
    if groups_differ:
        raise RuntimeError(f"ranks planned different Muon settings: their Muon parameters are in different param groups "
                           f"(here groups {indices}; a group added, deleted or moved on some ranks only?); "
                           f"{_SETTINGS_HINT}; nothing was modified")
    if settings_differ:  # the same groups (and entries per key) on every rank: name the first setting that differs
        entries = [(gi, name, value) for gi, key in settings for name, value in zip(setting_names, key)]
        hi, lo = _spread(group, torch.tensor([_digest(entry) for entry in entries], dtype=torch.float64, device=device))
        gi, name, _ = entries[int((hi != lo).nonzero()[0, 0])]
        raise RuntimeError(f"ranks planned different Muon settings: param group {gi}'s {name!r} differs across ranks; "
                           f"{_SETTINGS_HINT}; nothing was modified")
    if flags_differ:
        counts = torch.tensor(flags, dtype=torch.int32, device=device)
        dist.all_reduce(counts, group=group)
        world = dist.get_world_size(group)
        for p, count in zip(params, counts.tolist()):
            if 0 < count < world:
                raise RuntimeError(f"parameter {names()[id(p)]} has a gradient on {count} of {world} ranks and None on "
                                   "the others; every rank must produce it (or none): use it in every rank's forward, "
                                   "or zero its grad instead of setting it to None")
    return bool(hi[4])
