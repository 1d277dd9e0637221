"""``Muon``: a drop-in for torch.optim.Muon that also steps non-matrix parameters with AdamW.

Signature, defaults, per-step math and state layout (``state[p]["momentum_buffer"]``) follow
torch.optim.Muon, so swapping is one import. A step first validates every group (nothing is
modified if anything is wrong), then runs AdamW on ``use_muon=False`` groups and, for Muon
groups, one batched orthogonalization per bucket of same-shape matrices.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch.optim import Optimizer

from . import distributed as dist_muon
from . import momentum_precision, splits, variants
from .adamw import ADAMW_KEYS, adamw_step, check_adamw_settings
from .backends import BACKEND_NAMES, select_backend
from .ns_config import check_ns_dtype, resolve_ns_config
from .plan import ADJUST_LR_FNS, Plan, PlanRow, build_buckets, lr_scale, matrix_view

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MOMENTUM_FORMS = ("ema", "sgd")
# "cautious" (Chen et al. 2025, arXiv 2510.12402): decay only where the parameter and the update
# direction O agree in sign (W·O >= 0); the step is W -= lr·(scale·O + wd·[W·O >= 0]·W).
WEIGHT_DECAY_MODES = ("decoupled", "cautious")
_DTYPE_KEYS = ("ns_dtype", "momentum_dtype")
# Group keys whose values change which buckets exist or how they are iterated; the bucket plan is
# rebuilt when any of them (or a parameter's identity, dtype, device, shape) changes.
_PLAN_KEYS = (
    "ns_coefficients", "ns_steps", "eps", "ns_algorithm", "ns_normalization", "ns_gram_restarts",
    "weight_decay_mode", "ns_dtype", "momentum_dtype", "matrix_view", "adjust_lr_fn", "nesterov", "momentum_form",
    "backend", "momentum_rounding", *variants.DEFAULTS, *splits.DEFAULTS,
)


# Settings a user can rewrite in ``param_groups`` between steps; a step re-validates a group whose
# values changed since its last check, before anything is modified.
_MUON_SETTINGS = (
    "lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn", "backend",
    "ns_algorithm", "ns_normalization", "ns_gram_restarts", "weight_decay_mode", "ns_dtype", "momentum_dtype",
    "momentum_form", "matrix_view", "capturable", "momentum_rounding", *variants.DEFAULTS, *splits.DEFAULTS,
)
_ADAMW_SETTINGS = (*ADAMW_KEYS, "capturable")


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _settings_key(group: dict) -> tuple:
    """What a group's validation depends on. A tensor lr counts by identity and shape: its value is
    the scheduler's to change in place, and reading it back would cost a host sync every step."""
    keys = _MUON_SETTINGS if group["use_muon"] else _ADAMW_SETTINGS
    return tuple(
        ("tensor", id(v), tuple(v.shape)) if isinstance(v, torch.Tensor) else _freeze(v)
        for v in (group.get(k) for k in keys)
    )


def _label(group: dict, index: int, p: torch.Tensor) -> str:
    names = group.get("param_names")
    return repr(names[index]) if names else f"#{index} of shape {tuple(p.shape)}"


def _ns_config(group: dict):
    return resolve_ns_config(group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_algorithm"],
                             group["ns_normalization"], group["ns_gram_restarts"])


def _check_muon_settings(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("lr must be a float or a 1-element tensor")
    if not 0.0 <= float(lr):
        raise ValueError(f"lr must be >= 0, got {float(lr)}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {group['weight_decay_mode']!r}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
    _ns_config(group)
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    check_ns_dtype(group["ns_dtype"])
    if group["momentum_form"] not in MOMENTUM_FORMS:
        raise ValueError(f"momentum_form must be one of {MOMENTUM_FORMS}, got {group['momentum_form']!r}")
    if group["backend"] not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {group['backend']!r}")
    if not isinstance(group["capturable"], bool):
        raise ValueError(f"capturable must be True or False, got {group['capturable']!r}")
    variants.check_settings(group)
    splits.check_settings(group)
    momentum_precision.check_settings(group)


class Muon(Optimizer):
    """Muon for matrix parameters (2D, conv filters, 3D stacks), AdamW for everything else.

    A param group without ``use_muon`` is split at construction into a Muon group (ndim >= 2) and an
    AdamW group (the rest); the AdamW part takes the ``adamw_*`` settings, not the Muon ``lr``,
    ``eps`` and ``weight_decay`` of the group it came from.

    ``ns_algorithm`` ("standard", "gram", "auto"), ``ns_normalization`` (None: the preset's own,
    "frobenius", "aol") and ``ns_gram_restarts`` choose how each bucket is orthogonalized
    (docs/newton_schulz.md); ``ns_steps=None`` runs the preset's own number of steps. All are group
    keys, saved in ``state_dict()``; a checkpoint without them loads with this optimizer's values.
    ``weight_decay_mode="cautious"`` decays only the entries where W and the update O agree in sign.
    ``adaptive="normuon"`` (``normuon_beta2``, ``normuon_eps``) rescales O per output neuron by a
    second-moment EMA and back to its norm; ``constraint="hyperball"`` (``hyperball_eps``; needs
    ``weight_decay=0``) keeps each matrix on the sphere of its initial Frobenius norm
    (muon_kernels/variants.py). A state_dict saved with other variant names refuses to load.
    ``split_sizes``/``num_heads`` orthogonalize the pieces of a fused projection on their own
    (muon_kernels/splits.py); ``momentum_dtype="int8"`` or ``torch.bfloat16`` with
    ``momentum_rounding="stochastic"`` keep the momentum in low precision
    (muon_kernels/momentum_precision.py).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients=DEFAULT_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int | None = None,
        adjust_lr_fn: str | None = None,
        *,
        backend: str = "auto",
        ns_algorithm: str = "standard",
        ns_normalization: str | None = None,
        ns_gram_restarts: tuple[int, ...] | None = None,
        weight_decay_mode: str = "decoupled",
        adaptive: str = "none",
        normuon_beta2: float = 0.95,
        normuon_eps: float = 1e-10,
        constraint: str = "none",
        hyperball_eps: float = 1e-8,
        split_sizes: tuple[int, ...] | None = None,
        num_heads: int | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        momentum_dtype: torch.dtype | str | None = None,
        momentum_rounding: str = "nearest",
        momentum_form: str = "ema",
        matrix_view: str | None = None,
        max_workspace_bytes: int | None = 2**30,
        distributed: str = "auto",
        process_group=None,
        capturable: bool = False,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        check_adamw_settings(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, "adamw_")
        if max_workspace_bytes is not None and not (isinstance(max_workspace_bytes, int) and max_workspace_bytes > 0):
            raise ValueError(f"max_workspace_bytes must be None or an int > 0, got {max_workspace_bytes!r}")
        self.max_workspace_bytes = max_workspace_bytes
        dist_muon.check_process_group(distributed, process_group)
        self.distributed = distributed
        self.process_group = process_group
        self._adamw_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_algorithm": ns_algorithm,
            "ns_normalization": ns_normalization,
            "ns_gram_restarts": ns_gram_restarts,
            "weight_decay_mode": weight_decay_mode,
            "adaptive": adaptive,
            "normuon_beta2": normuon_beta2,
            "normuon_eps": normuon_eps,
            "constraint": constraint,
            "hyperball_eps": hyperball_eps,
            "split_sizes": split_sizes,
            "num_heads": num_heads,
            "use_muon": True,
            "backend": backend,
            "ns_dtype": ns_dtype,
            "momentum_dtype": momentum_dtype,
            "momentum_rounding": momentum_rounding,
            "momentum_form": momentum_form,
            "matrix_view": matrix_view,
            "capturable": capturable,
        }
        _check_muon_settings(defaults)
        self._plan_key: tuple | None = None
        self._validated: dict[int, tuple] = {}  # group index → settings key of its last successful check
        self._buckets: list = []
        self._layouts: list = []  # per bucket: (layout, process group, owner rank of each entry)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds the group — or, for a group without ``use_muon``, its Muon and AdamW halves — all or
        nothing: if either half is refused, neither is added (torch's optimizers add nothing either)."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else params
        if isinstance(group["params"], set):
            raise TypeError("params must be an ordered collection (a list), not a set")
        group["params"] = list(group["params"])
        parts = self._split_by_ndim(group) if "use_muon" not in group else [group]
        count = len(self.param_groups)
        try:
            for part in parts:
                self._add_group(part)
        except BaseException:
            del self.param_groups[count:]
            raise

    def _add_group(self, group: dict[str, Any]) -> None:
        tensors = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        names = [p[0] for p in group["params"] if isinstance(p, tuple)]
        if group["use_muon"]:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _check_muon_settings(group)
            labels = {"param_names": names} if names else {}
            for i, p in enumerate(tensors):
                if torch.is_complex(p):
                    raise ValueError(f"parameter {_label(labels, i, p)}: Muon does not support complex parameters")
                view = matrix_view(p.shape, group["matrix_view"], _label(labels, i, p))
                for part, _ in splits.pieces(view, group["split_sizes"], group["num_heads"], _label(labels, i, p)):
                    if group["momentum_dtype"] == momentum_precision.INT8:
                        momentum_precision.check_piece(part, _label(labels, i, p))
                select_backend(group["backend"], p.device)  # raises now if an explicit backend can't run
        else:
            for key in ADAMW_KEYS:
                group.setdefault(key, self._adamw_defaults[key])
            group.setdefault("capturable", self.defaults["capturable"])
            check_adamw_settings(group["lr"], group["betas"], group["eps"], group["weight_decay"], "")
        super().add_param_group(group)

    def _split_by_ndim(self, group: dict) -> list[dict]:
        """A group without ``use_muon``: matrices (ndim >= 2) to Muon, the rest to AdamW."""
        group = {k: v for k, v in group.items() if k != "param_reasons"}  # per-parameter lists would misalign
        muon = {**group, "params": [], "use_muon": True}
        rest = {k: v for k, v in group.items() if k not in ("lr", "eps", "weight_decay")}
        rest.update(params=[], use_muon=False)
        for item in group["params"]:
            p = item[1] if isinstance(item, tuple) else item
            (muon if p.ndim >= 2 else rest)["params"].append(item)
        return [part for part in (muon, rest) if part["params"]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's layout; dtype settings are saved by name ("bfloat16"), because torch.distributed's
        checkpoint utilities only walk tensors, numbers, strings and containers."""
        state = super().state_dict()
        for group in state["param_groups"]:
            for key in _DTYPE_KEYS:
                if isinstance(group.get(key), torch.dtype):
                    group[key] = str(group[key]).removeprefix("torch.")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Accepts ours and torch.optim.Muon's; keys an older state_dict lacks keep this optimizer's values."""
        state_dict = dict(state_dict)
        saved_groups = deepcopy(state_dict["param_groups"])
        for index, (current, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if current["use_muon"]:
                variants.check_checkpoint(saved, current, index)
            for key, value in current.items():
                saved.setdefault(key, value)
            for key in _DTYPE_KEYS:
                if isinstance(saved.get(key), str) and saved[key] != momentum_precision.INT8:
                    dtype = getattr(torch, saved[key], None)
                    if not isinstance(dtype, torch.dtype):
                        raise ValueError(f"state_dict param group has {key}={saved[key]!r}, which is not a torch dtype")
                    saved[key] = dtype
        state_dict["param_groups"] = saved_groups
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype; a momentum buffer kept in another
        # dtype (momentum_dtype=fp32 for bf16 params, int8), the int8 scales, the stochastic-rounding
        # step counter and the variants' fp32 state are restored from the saved tensors instead.
        for group, saved in zip(self.param_groups, saved_groups):
            if not group["use_muon"]:
                continue
            for p, pid in zip(group["params"], saved["params"]):
                dtypes = {"momentum_buffer": momentum_precision.buffer_dtype(group, p.dtype),
                          "momentum_scale": torch.float32, "momentum_step": torch.int64, "normuon_v": torch.float32,
                          "hyperball_radius": torch.float32}
                for key, dtype in dtypes.items():
                    value = state_dict["state"].get(pid, {}).get(key)
                    if value is not None:
                        self.state[p][key] = value.to(device=p.device, dtype=dtype)
        self._plan_key = None

    # ------------------------------------------------------------------ plan
    def _muon_items(self, group_index: int, group: dict, params: list[torch.Tensor]):
        config = _ns_config(group)
        index = {id(p): i for i, p in enumerate(group["params"])}
        variant = variants.variant(group)
        low = momentum_precision.mode(group)
        for p in params:
            name = _label(group, index[id(p)], p)
            whole = matrix_view(p.shape, group["matrix_view"], name)
            for part, view in splits.pieces(whole, group["split_sizes"], group["num_heads"], name) or [(None, whole)]:
                if low.int8:
                    momentum_precision.check_piece(part, name)
                yield (
                    group_index,
                    p,
                    view,
                    # the hyperball normalizes the update, so a scale on it would have no effect
                    1.0 if variant.hyperball else lr_scale(*view.lr_shape, group["adjust_lr_fn"]),
                    momentum_precision.stack_dtype(group, p.dtype),
                    config,
                    group["ns_dtype"],
                    group["nesterov"],
                    group["momentum_form"],
                    group["backend"],
                    group["weight_decay_mode"] == "cautious",
                    variant,
                    low,
                    part,
                    momentum_precision.entry_seed(group_index, index[id(p)], part) if low.stochastic else 0,
                )

    def _plan_buckets(self, work: list[tuple[int, dict, list[torch.Tensor]]]):
        key = tuple(
            (gi, *(_freeze(group[k]) for k in _PLAN_KEYS), tuple((id(p), p.dtype, p.device, p.shape) for p in params))
            for gi, group, params in work
        ) + (id(dist_muon.replicated_group(self.distributed, self.process_group)),)
        if key != self._plan_key:
            items = [item for gi, group, params in work for item in self._muon_items(gi, group, params)]
            buckets = build_buckets(items)
            self._layouts = self._distribute(buckets, verify=True)
            self._buckets = buckets
            self._plan_key = key
        return self._buckets

    def _names(self) -> dict[int, str]:
        return {id(p): _label(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])}

    def _distribute(self, buckets, verify: bool = False) -> list[tuple[str, Any, list[int] | None]]:
        """Per bucket: how it is computed ("local", "replicated", "sharded"), over which group, and
        which rank orthogonalizes each entry (ranks are assigned per group, in bucket order).
        ``verify`` (step only, never plan(), which one rank may call alone): check with one
        collective per group that every rank planned the same buckets."""
        names = self._names()
        replicated = dist_muon.replicated_group(self.distributed, self.process_group)
        kinds = [dist_muon.bucket_layout(b, names, replicated) for b in buckets]
        layouts: list = [(kind, group, None) for kind, group in kinds]
        for group in dict.fromkeys(g for kind, g in kinds if kind != "local"):
            idx = [i for i, (kind, g) in enumerate(kinds) if kind != "local" and g is group]
            if verify:
                dist_muon.check_same_plan(group, [buckets[i] for i in idx], replicated=group is replicated)
            world = dist_muon.dist.get_world_size(group)
            for i, owners in zip(idx, dist_muon.assign_owners([buckets[i] for i in idx], world)):
                layouts[i] = (kinds[i][0], group, owners)
        return layouts

    def plan(self) -> Plan:
        """Where each parameter goes: Muon or AdamW, matrix view, backend, kernel path, and why."""
        rows = Plan()
        work = [
            (gi, g, [p for p in g["params"] if p.numel() > 0]) for gi, g in enumerate(self.param_groups) if g["use_muon"]
        ]
        buckets = build_buckets([it for gi, g, ps in work for it in self._muon_items(gi, g, ps)])
        layouts = self._distribute(buckets)
        where: dict[int, list] = {}  # per parameter, its entries (several for a split one)
        for b, (layout, _, owners) in zip(buckets, layouts):
            for j, e in enumerate(b.entries):
                where.setdefault(id(e.param), []).append((b, e, layout, owners[j] if owners else None))
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"group{gi}[{i}]" for i in range(len(group["params"]))]
            reasons = group.get("param_reasons") or [None] * len(group["params"])
            rows.notes += [n for n in group.get("routing_notes", ()) if n not in rows.notes]
            for name, p, reason in zip(names, group["params"], reasons):
                common = (name, tuple(p.shape), p.dtype, p.device)
                if not group["use_muon"]:
                    why = reason or (f"ndim {p.ndim} < 2" if p.ndim < 2 else "group has use_muon=False")
                    rows.append(PlanRow(*common, "AdamW", "-", "torch", "fused/foreach adamw", why))
                elif id(p) not in where:
                    rows.append(PlanRow(*common, "skip", "-", "-", "-", "zero-size parameter"))
                else:
                    entries = where[id(p)]
                    b, e, layout, owner = entries[0]
                    path, how = b.backend.kernel_path(b.m, b.n, b.ns_dtype, b.device, b.config)
                    dtype = str(b.ns_dtype).removeprefix("torch.")
                    variant = "".join(f"; {v}" for v in ("cautious weight decay" if b.cautious else "",
                                                           b.variant.describe(), b.low_precision.describe()) if v)
                    buckets_of = "; ".join(dict.fromkeys(f"bucket of {x.matrices} matrices {x.m}×{x.n} {dtype}"
                                                         for x, *_ in entries))
                    view = e.view.describe()
                    if e.part is not None:
                        split = splits.describe(group["split_sizes"], group["num_heads"])
                        view = f"{len(entries)} pieces: " + ", ".join(dict.fromkeys(x.view.describe()
                                                                                     for _, x, *_ in entries))
                        reason = f"{reason}; {split}" if reason else split
                    why = (f"{reason}; " if reason else "") + f"{b.why}; {b.algorithm}{variant}; {how}; {buckets_of}"
                    ranks = dict.fromkeys("local" if o is None else f"{o} ({lay})" for _, _, lay, o in entries)
                    rows.append(PlanRow(*common, "Muon", view, b.backend.NAME, path, why, ", ".join(ranks)))
        return rows

    # ------------------------------------------------------------------ step
    def _check_settings(self) -> None:
        """Re-validate every group whose settings changed since its last check (values written into
        ``param_groups`` after construction: a scheduler's, a user's), naming the group."""
        for gi, group in enumerate(self.param_groups):
            key = _settings_key(group)
            if self._validated.get(gi) == key:
                continue
            try:
                if group["use_muon"]:
                    _check_muon_settings(group)
                else:
                    check_adamw_settings(group["lr"], group["betas"], group["eps"], group["weight_decay"], "")
            except ValueError as exc:
                raise ValueError(f"param group {gi}: {exc}; nothing was modified") from None
            self._validated[gi] = key

    def _check_grads(self) -> list[tuple[int, dict, list[torch.Tensor]]]:
        """Validate settings and every gradient before anything is modified; return (group index,
        group, params) to step."""
        self._check_settings()
        work = []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if group.get("capturable") and isinstance(lr, torch.Tensor):
                for i, p in enumerate(group["params"]):
                    if p.device != lr.device:
                        raise ValueError(
                            f"param group {gi} has capturable=True and lr on {lr.device}, but parameter "
                            f"{_label(group, i, p)} is on {p.device}: put lr on the parameters' device "
                            "(a host lr would be copied during CUDA-graph capture)"
                        )
            params = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None or (group["use_muon"] and p.numel() == 0):
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"parameter {_label(group, i, p)}: Muon does not support sparse gradients")
                if group["use_muon"] and torch.is_complex(g):
                    raise RuntimeError(f"parameter {_label(group, i, p)}: Muon does not support complex gradients")
                if g.shape != p.shape:
                    raise RuntimeError(
                        f"parameter {_label(group, i, p)}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}"
                    )
                params.append(p)
            work.append((gi, group, params))
        self._check_distributed_grads()
        return work

    def _check_distributed_grads(self) -> None:
        """Where ranks orthogonalize together, a Muon gradient must exist on all ranks or on none."""
        if not (dist_muon.dist.is_available() and dist_muon.dist.is_initialized()):
            return  # single process (DTensors need an initialized process group too): nothing to agree on
        muon = [p for g in self.param_groups if g["use_muon"] for p in g["params"] if p.numel() > 0]
        groups: dict[Any, list[torch.Tensor]] = {}
        replicated = dist_muon.replicated_group(self.distributed, self.process_group)
        for p in muon:
            if dist_muon.is_dtensor(p):
                groups.setdefault(p.device_mesh.get_group() if p.device_mesh.ndim == 1 else None, []).append(p)
            elif replicated is not None:
                groups.setdefault(replicated, []).append(p)
        names = None
        for group, params in groups.items():
            if group is not None:  # a multi-dim mesh is refused with its own error when the plan is built
                names = names or self._names()
                dist_muon.check_grad_agreement(group, params, names, replicated=group is replicated)

    def _momentum_buffer(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The momentum buffer in the group's momentum dtype (int8 with its block scales), created
        at the first step or converted when the group's momentum_dtype changed."""
        state = self.state[p]
        dtype = momentum_precision.buffer_dtype(group, p.dtype)
        if "momentum_buffer" not in state:
            int8 = dtype == torch.int8
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype,
                                                        memory_format=torch.contiguous_format if int8
                                                        else torch.preserve_format)
            if int8:
                state["momentum_scale"] = momentum_precision.new_scales(p)
        elif state["momentum_buffer"].dtype != dtype:
            state["momentum_buffer"] = momentum_precision.convert(state, p, dtype)
        return state["momentum_buffer"]

    def _advance_momentum_steps(self, buckets) -> None:
        """Stochastic rounding draws from (seed, step): one increment per parameter per step, on the
        parameter's device (no host round trip; a CUDA graph replays it)."""
        steps = {}
        for b in buckets:
            if b.low_precision.stochastic:
                for e in b.entries:
                    st = self.state[e.param]
                    if "momentum_step" not in st:
                        st["momentum_step"] = torch.zeros((), dtype=torch.int64, device=e.param.device)
                    steps[id(e.param)] = st["momentum_step"]
        if steps:
            torch._foreach_add_(list(steps.values()), 1)

    def _init_variant_state(self, buckets) -> None:
        """NorMuon's v and the hyperball radii of parameters stepping for the first time, before
        anything is modified (a zero-norm hyperball matrix raises here)."""
        entries = [(e.param, e.view, b.variant, e.part) for b in buckets for e in b.entries
                   if (b.variant.normuon and "normuon_v" not in self.state[e.param])
                   or (b.variant.hyperball and "hyperball_radius" not in self.state[e.param])]
        if entries:
            variants.init_state(entries, self.state, self._names())

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._check_grads()
        muon_work = [w for w in work if w[1]["use_muon"] and w[2]]
        buckets = self._plan_buckets(muon_work)
        self._init_variant_state(buckets)
        self._advance_momentum_steps(buckets)
        for _, group, params in work:
            if not group["use_muon"]:
                adamw_step(group, params, self.state)
        # Collectives are started in the same order on every rank: sharded gathers, replicated
        # gathers, sharded scatters; local work and later buckets' Newton–Schulz overlap them.
        gathers, replicated = [], []
        for bucket, (layout, group, owners) in zip(buckets, self._layouts):
            bufs = [self._momentum_buffer(e.param, self.param_groups[e.group]) for e in bucket.entries]
            if layout == "sharded":  # pieces of the local shards, taken in muon_kernels/distributed.py
                gathers.append((bucket, group, owners, dist_muon.start_sharded_gather(
                    bucket, owners, group, self.param_groups, self.state)))
                continue
            bufs = [e.piece(b) for e, b in zip(bucket.entries, bufs)]
            grads = [e.piece(e.param.grad) for e in bucket.entries]
            stack = bucket.backend.momentum_stack(bucket, grads, bufs, self.param_groups, self.state)
            if layout == "replicated":
                replicated.append((bucket, dist_muon.start_replicated(bucket, owners, group, stack,
                                                                      self.max_workspace_bytes)))
                continue
            ortho = bucket.orthogonalize(stack, self.max_workspace_bytes)
            bucket.backend.apply_update(bucket, ortho, self.param_groups, self.state)
        scatters = [(bucket, group, owners, dist_muon.start_sharded_scatter(bucket, owners, group, gathered,
                                                                            self.max_workspace_bytes))
                    for bucket, group, owners, gathered in gathers]
        for bucket, handle in replicated:
            bucket.backend.apply_update(bucket, dist_muon.finish_replicated(handle), self.param_groups, self.state)
        for bucket, group, owners, handle in scatters:
            dist_muon.finish_sharded(bucket, owners, group, handle, self.param_groups, self.state)
        return loss
