"""Validation of what a user hands the optimizer: group settings, and the gradients of a step.

Everything here raises before the optimizer modifies anything: a step first re-validates the groups
whose settings changed since their last check (a scheduler's or a user's writes into
``param_groups``), then every gradient, and only then steps.
"""

from __future__ import annotations

import math

from typing import Any

import torch
import torch.distributed as dist

from . import momentum_precision, rank_agreement, splits, variants
from .adamw import ADAMW_FLAGS, ADAMW_KEYS
from .backends import BACKEND_NAMES
from .bucket import is_dtensor
from .ns_config import NSConfig, check_ns_dtype, resolve_ns_config
from .real_number import number

MOMENTUM_FORMS = ("ema", "sgd")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral")
# "cautious" (Chen et al. 2025, arXiv 2510.12402): decay only where the parameter and the update
# direction O agree in sign (W·O >= 0); the step is W -= lr·(scale·O + wd·[W·O >= 0]·W).
WEIGHT_DECAY_MODES = ("decoupled", "cautious")
DTYPE_KEYS = ("ns_dtype", "momentum_dtype")
# Group keys whose values change which buckets exist or how they are iterated; the bucket plan is
# rebuilt when any of them (or a parameter's identity, dtype, device, shape) changes.
PLAN_KEYS = (
    "ns_coefficients", "ns_steps", "eps", "ns_algorithm", "ns_normalization", "ns_gram_restarts",
    "weight_decay_mode", "ns_dtype", "momentum_dtype", "matrix_view", "adjust_lr_fn", "nesterov", "momentum_form",
    "backend", "momentum_rounding", *variants.DEFAULTS, *splits.DEFAULTS,
)
# Settings a user can rewrite in ``param_groups`` between steps; a step re-validates a group whose
# values changed since its last check, before anything is modified.
MUON_SETTINGS = (
    "lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn", "backend",
    "ns_algorithm", "ns_normalization", "ns_gram_restarts", "weight_decay_mode", "ns_dtype", "momentum_dtype",
    "momentum_form", "matrix_view", "capturable", "momentum_rounding", *variants.DEFAULTS, *splits.DEFAULTS,
    "maximize",
)
ADAMW_SETTINGS = (*ADAMW_KEYS, *ADAMW_FLAGS, "capturable", "differentiable")
# The constructor's settings that hold for every group (Muon's docstring).
OPTIMIZER_WIDE = ("dispatch", "max_workspace_bytes", "distributed", "process_group", "cuda_graph", "overlap_adamw",
                  *(f"adamw_{k}" for k in ADAMW_KEYS))


def freeze(value: Any) -> Any:
    """A setting as a comparable key: sequences as tuples, each scalar with its type — Python has
    0 == False and 5.0 == 5, but a value changed from one to the other must be checked again."""
    return tuple(freeze(v) for v in value) if isinstance(value, (list, tuple)) else (type(value), value)


def settings_key(group: dict, portable: bool = False) -> tuple:
    """What a group's validation depends on. A tensor lr counts by identity and shape: its value is
    the scheduler's to change in place, and reading it back would cost a host sync every step.
    ``portable``: the same in every process (a tensor by dtype and shape), for comparing ranks."""
    keys = MUON_SETTINGS if group["use_muon"] else ADAMW_SETTINGS
    return (freeze(group["use_muon"]), *(
        ("tensor", str(v.dtype) if portable else id(v), tuple(v.shape)) if isinstance(v, torch.Tensor) else freeze(v)
        for v in (group.get(k) for k in keys)
    ))


def label(group: dict, index: int, p: torch.Tensor) -> str:
    names = group.get("param_names")
    return repr(names[index]) if names else f"#{index} of shape {tuple(p.shape)}"


def ns_config(group: dict) -> NSConfig:
    return resolve_ns_config(group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_algorithm"],
                             group["ns_normalization"], group["ns_gram_restarts"])


def check_muon_settings(group: dict) -> None:
    if not 0.0 <= number("lr", group["lr"], tensor=True) < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {float(group['lr'])}")
    if not 0.0 <= number("weight_decay", group["weight_decay"], tensor=True) < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {group['weight_decay']}")
    if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {group['weight_decay_mode']!r}")
    if not 0.0 <= number("momentum", group["momentum"], tensor=True) < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']} (at 1 the buffer never takes in a "
                         "gradient: torch.optim.Muon accepts it and then only decays the parameters); the usual value "
                         "is 0.95")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
    ns_config(group)
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    check_ns_dtype(group["ns_dtype"])
    if group["momentum_form"] not in MOMENTUM_FORMS:
        raise ValueError(f"momentum_form must be one of {MOMENTUM_FORMS}, got {group['momentum_form']!r}")
    if group["backend"] not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {group['backend']!r}")
    if not isinstance(group["capturable"], bool):
        raise ValueError(f"capturable must be True or False, got {group['capturable']!r}")
    if group.get("maximize", False):  # torch.optim.Muon has none; AdamW groups honour it (adamw.py)
        raise ValueError("maximize=True: Muon has no maximize (torch.optim.Muon neither); minimize the negated "
                         "loss instead. Only a use_muon=False (AdamW) group may maximize, and a group given "
                         "without use_muon is split into a Muon and an AdamW half, so it may not")
    variants.check_settings(group)
    splits.check_settings(group)
    momentum_precision.check_settings(group)


def check_adamw_settings(lr, betas, eps, weight_decay, where: str) -> None:
    """An AdamW group's settings (``where``: "adamw_" for the constructor's defaults)."""
    if not 0.0 <= number(f"{where}lr", lr, tensor=True) < math.inf:
        raise ValueError(f"{where}lr must be a finite number >= 0, got {float(lr)}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(0.0 <= number(f"{where}betas", b, tensor=True) < 1.0 for b in betas)):
        raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
    if not 0.0 <= number(f"{where}eps", eps, tensor=True):
        raise ValueError(f"{where}eps must be >= 0, got {eps}")
    if not 0.0 <= number(f"{where}weight_decay", weight_decay, tensor=True) < math.inf:
        raise ValueError(f"{where}weight_decay must be a finite number >= 0, got {weight_decay}")


def check_adamw_group(group: dict) -> None:
    check_adamw_settings(group["lr"], group["betas"], group["eps"], group["weight_decay"], "")
    for key in ("capturable", *ADAMW_FLAGS):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"{key} must be True or False, got {group[key]!r}")
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported: the AdamW half steps under torch.no_grad() (as "
                         "Muon's step does); remove the key or set it to False")


def check_listed_once(items: list) -> None:
    """A group's parameters (tensors or (name, tensor) pairs) each once: torch.optim warns that a
    repeat will become an error and steps such a parameter twice; ours would not step it as torch."""
    seen: dict[int, int] = {}
    for i, item in enumerate(items):
        p = item[1] if isinstance(item, tuple) else item
        if seen.setdefault(id(p), i) != i:
            name = repr(item[0]) if isinstance(item, tuple) else f"of shape {tuple(p.shape)}"
            raise ValueError(f"parameter {name} is listed twice in one param group (positions {seen[id(p)]} and "
                             f"{i}): list it once (torch.optim warns that this will become an error, and steps such "
                             "a parameter twice)")


def check_group_keys(group: dict) -> None:
    """A group handed to ``add_param_group``: ``use_muon`` a bool where given, and none of the
    optimizer-wide settings, which a group would otherwise carry without effect."""
    if "use_muon" in group and not isinstance(group["use_muon"], bool):
        raise ValueError(f"use_muon must be True (Muon) or False (AdamW), or left out to split the group into its "
                         f"matrices (Muon) and the rest (AdamW), got {group['use_muon']!r}")
    for key in OPTIMIZER_WIDE:
        if key in group:
            fix = ("give those parameters a group with use_muon=False and its own lr, betas, eps, weight_decay"
                   if key.startswith("adamw_") else f"pass {key} to Muon(...)")
            raise ValueError(f"{key} is an optimizer-wide setting, not a param group's: {fix}")


def check_changed_groups(param_groups: list[dict], validated: dict[int, tuple[dict, tuple]]) -> None:
    """Re-validate every group whose settings changed since its last check (``validated``: group
    index → (the group, its settings key at its last successful check), made when the group was
    added and updated here), naming the group. A group's kind (``use_muon``) is fixed when it is
    added. A group found at another index (one before it was deleted from ``param_groups``) is
    found by identity; one that is not the group checked there is checked as new."""
    by_identity = None
    for gi, group in enumerate(param_groups):
        key = settings_key(group)
        record = validated.get(gi)
        if record is not None and record[0] is group and record[1] == key:
            continue
        if record is None or record[0] is not group:
            if by_identity is None:
                by_identity = {id(r[0]): r for r in validated.values()}
            record = by_identity.get(id(group))
        before = None if record is None else record[1]
        if before is not None and before[0] != key[0]:
            raise ValueError(f"param group {gi}: use_muon changed from {before[0][1]!r} to {group['use_muon']!r}, but "
                             "a group's kind is fixed when it is added: add a new group with add_param_group instead; "
                             "nothing was modified")
        if before != key:
            try:
                check_muon_settings(group) if group["use_muon"] else check_adamw_group(group)
            except ValueError as exc:
                raise ValueError(f"param group {gi}: {exc}; nothing was modified") from None
            except KeyError as exc:  # a group put into param_groups by hand, not by add_param_group
                kind = "a Muon" if group["use_muon"] else "an AdamW"
                raise ValueError(f"param group {gi} has use_muon={group['use_muon']!r} but no {exc.args[0]!r}, "
                                 f"which {kind} group needs: add groups with add_param_group, which fills in the "
                                 "defaults; nothing was modified") from None
        validated[gi] = (group, key)
    for gi in [gi for gi in validated if gi >= len(param_groups)]:  # groups deleted from the list
        del validated[gi]


def check_grads(param_groups: list[dict]) -> list[tuple[int, dict, list[torch.Tensor]]]:
    """Validate every gradient before anything is modified; return (group index, group, params with
    a gradient) per group."""
    work = []
    for gi, group in enumerate(param_groups):
        lr = group["lr"]
        if group.get("capturable") and isinstance(lr, torch.Tensor):
            for i, p in enumerate(group["params"]):
                if p.device != lr.device:
                    raise ValueError(
                        f"param group {gi} has capturable=True and lr on {lr.device}, but parameter "
                        f"{label(group, i, p)} is on {p.device}: put lr on the parameters' device "
                        "(a host lr would be copied during CUDA-graph capture)"
                    )
        params = []
        muon = group["use_muon"]
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None or (muon and p.numel() == 0):
                continue
            # One cheap test per gradient (a step runs it over every parameter: the messages cost
            # ~2 µs each to build); the message only on failure. Muon: a real floating-point gradient
            # (complex dtypes are not floating point); AdamW: a floating-point or complex one of the
            # parameter's own dtype (torch's would fail half-way through the group, its state made).
            dtype = g.dtype
            ok = dtype.is_floating_point if muon else dtype == p.dtype and (dtype.is_floating_point or dtype.is_complex)
            if g.is_sparse or g.shape != p.shape or not ok:
                raise _grad_error(gi, group, i, p, g)
            params.append(p)
        work.append((gi, group, params))
    return work


def _grad_error(gi: int, group: dict, i: int, p: torch.Tensor, g: torch.Tensor) -> RuntimeError:
    kind = "Muon" if group["use_muon"] else "AdamW"
    # the group and its kind: a group without use_muon was split at construction, so an index
    # counts within its Muon or its AdamW half, not in the list the user passed
    where = f"param group {gi} ({kind}), parameter {label(group, i, p)}"
    if g.is_sparse:
        return RuntimeError(f"{where}: a sparse gradient, which the {kind} half does not support; give it a dense "
                            "gradient (e.g. nn.Embedding(..., sparse=False)) or step it with torch.optim.SparseAdam; "
                            "nothing was modified")
    if group["use_muon"] and g.dtype.is_complex:
        return RuntimeError(f"{where}: Muon does not support complex gradients; nothing was modified")
    if g.shape != p.shape:
        return RuntimeError(f"{where}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}; "
                            "nothing was modified")
    if not (g.dtype.is_floating_point or g.dtype.is_complex):
        what = "a floating-point" if group["use_muon"] else "a floating-point (or complex)"
        return RuntimeError(f"{where}: {kind} needs {what} gradient, got {g.dtype}; nothing was modified")
    return RuntimeError(f"{where}: gradient dtype {g.dtype} != parameter dtype {p.dtype}; AdamW steps a parameter "
                        "with a gradient of its own dtype; nothing was modified")


def names(param_groups: list[dict]) -> dict[int, str]:
    """Each parameter's label (by id) for error messages, with its group (an index counts within one)."""
    return {id(p): f"{label(g, i, p)} (param group {gi})"
            for gi, g in enumerate(param_groups) for i, p in enumerate(g["params"])}


def check_distributed_grads(param_groups: list[dict], replicated, rebuild: bool) -> bool:
    """Where ranks orthogonalize together, in one small all-reduce per process group per step: a
    Muon gradient must exist on all ranks or on none, the ranks' Muon settings must agree (a
    setting changed on one rank only, at any step, is refused on all of them before anything is
    modified), and the plan is rebuilt on every rank where any rank rebuilds it (``rebuild``: this
    rank's own decision; the rebuild's checks are collectives, which one rank alone would hang in).
    ``replicated``: the group replicated buckets are split over, or None. Returns whether to rebuild."""
    if not (dist.is_available() and dist.is_initialized()):
        return rebuild  # single process (DTensors need an initialized process group too): nothing to agree on
    groups: dict[Any, tuple[list[torch.Tensor], dict[int, None]]] = {}
    for gi, g in enumerate(param_groups):
        if not g["use_muon"]:
            continue
        for p in g["params"]:
            if p.numel() == 0:
                continue
            if is_dtensor(p):
                key = p.device_mesh.get_group() if p.device_mesh.ndim == 1 else None
            elif replicated is not None:
                key = replicated
            else:
                continue
            params, indices = groups.setdefault(key, ([], {}))
            params.append(p)
            indices[gi] = None
    agreed = rebuild
    for group, (params, indices) in groups.items():
        if group is not None:  # a multi-dim mesh is refused with its own error when the plan is built
            keys = [(gi, settings_key(param_groups[gi], portable=True)) for gi in indices]
            agreed |= rank_agreement.check_grad_agreement(group, params, lambda: names(param_groups), keys,
                                                          ("use_muon", *MUON_SETTINGS), rebuild=rebuild,
                                                          replicated=group is replicated)
    return agreed
