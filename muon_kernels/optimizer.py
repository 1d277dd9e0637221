"""``Muon``: a drop-in for torch.optim.Muon that also steps non-matrix parameters with AdamW.

Signature, defaults, per-step math and state layout (``state[p]["momentum_buffer"]``) follow
torch.optim.Muon, so swapping is one import. A step first validates every group (nothing is
modified if anything is wrong), then runs AdamW on ``use_muon=False`` groups and, for Muon
groups, one batched orthogonalization per bucket of same-shape matrices.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.optim import Optimizer

from . import distributed as dist_muon
from . import checkpoint, graphs, momentum_precision, settings, variants, workspace
from .adamw import ADAMW_FLAGS, ADAMW_KEYS, adamw_step
from .backends import measured
from .plan import build_buckets, check_params, describe, group_items

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class Muon(Optimizer):
    """Muon for matrix parameters (2D, conv filters, 3D stacks), AdamW for everything else.

    A param group without ``use_muon`` is split at construction into a Muon group (ndim >= 2) and an
    AdamW group (the rest); the AdamW part takes the ``adamw_*`` settings, not the Muon ``lr``,
    ``eps`` and ``weight_decay`` of the group it came from. A group may set its own value of any
    argument below except the optimizer-wide ``dispatch``, ``max_workspace_bytes``, ``distributed``,
    ``process_group``, ``cuda_graph``, ``overlap_adamw`` and ``adamw_*`` (an AdamW group sets ``lr``,
    ``betas``, ``eps``, ``weight_decay``).

    Args (torch.optim.Muon's, same positions and defaults):
        params: tensors, ``(name, tensor)`` pairs or param groups (``muon_kernels.param_groups(model)``
            routes embeddings and the output head to AdamW).
        lr, weight_decay, momentum, nesterov, eps: as torch.optim.Muon (decoupled decay ``W *= 1 - lr·wd``,
            momentum ``M = μM + (1-μ)G``, Nesterov ``U = (1-μ)G + μM``, ``eps`` clamps ‖U‖_F).
        ns_coefficients: ``(a, b, c)``, a list of per-step tuples, or a preset name ("keller",
            "quintic", "polar_express", "turbo"; ``muon_kernels.PRESETS``).
        ns_steps: None (the preset's own count; 5 for tuples) or an int in [0, 100).
        adjust_lr_fn: None/"original", "match_rms_adamw" or "spectral" (the per-shape lr scale).
    Keyword-only (README "Options beyond torch.optim.Muon" has the details):
        backend: "auto", "torch", "triton", "cuda"; dispatch: "auto" (time every path per bucket on
            a GPU, keep the fastest; the table where ranks step alone: distributed="off" with
            several ranks), "measure" (there too) or "table".
        ns_algorithm ("standard", "gram", "auto"), ns_normalization (None, "frobenius", "aol"),
            ns_gram_restarts, ns_dtype (bf16, fp16, fp32): how each bucket is orthogonalized
            (docs/newton_schulz.md).
        weight_decay_mode: "decoupled" or "cautious" (decay only where W and O agree in sign).
        adaptive, normuon_beta2, normuon_eps: "normuon" rescales O per output neuron by a
            second-moment EMA; constraint, hyperball_eps: "hyperball" keeps each matrix on the sphere
            of its initial norm (needs weight_decay=0) (muon_kernels/variants.py).
        split_sizes, num_heads: orthogonalize the pieces of a fused projection on their own.
        momentum_dtype (None, a float dtype, "int8"), momentum_rounding ("nearest", "stochastic"),
            momentum_form ("ema", "sgd"): the momentum buffer's storage and recurrence.
        matrix_view: None, "transposed", "batch", "batch_transposed", "flatten".
        max_workspace_bytes: cap on one bucket's working set (None: no cap).
        distributed ("auto", "off"), process_group: DDP/FSDP2 (each matrix orthogonalized on one rank).
        capturable: no host syncs in a step (CUDA-graph capture); cuda_graph: capture the step's device
            work once and replay it while no storage or setting changes (muon_kernels/graphs.py).
        overlap_adamw: run the AdamW half on a side stream beside the Muon half on a GPU.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW half's settings.
    A state_dict saved with other variant names refuses to load; one with fewer keys loads with this
    optimizer's values for them.
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
        dispatch: str = "auto",
        distributed: str = "auto",
        process_group=None,
        capturable: bool = False,
        cuda_graph: bool = False,
        overlap_adamw: bool = True,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        settings.check_adamw_settings(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, "adamw_")
        if max_workspace_bytes is not None and not (isinstance(max_workspace_bytes, int) and max_workspace_bytes > 0):
            raise ValueError(f"max_workspace_bytes must be None or an int > 0, got {max_workspace_bytes!r}")
        self.max_workspace_bytes = max_workspace_bytes
        measured.mode(dispatch)  # raises on a bad value
        self.dispatch = dispatch
        for name, value in (("cuda_graph", cuda_graph), ("overlap_adamw", overlap_adamw)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self._graph = graphs.StepGraph() if cuda_graph else None
        self.overlap_adamw = overlap_adamw
        self._side_streams: dict = {}
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
            "capturable": capturable or cuda_graph,  # a captured step needs capturable AdamW and scalars
        }
        # The hyperball's weight_decay = 0 is checked per group (groups may set it; the default is 0.1).
        settings.check_muon_settings({**defaults, "constraint": "none"} if constraint == "hyperball" else defaults)
        self._plan_key: tuple | None = None
        self._validated: dict[int, tuple] = {}  # group index → (group, settings key of its last successful check)
        self._buckets: list = []
        self._placements: list = []  # per bucket: how it is computed under torch.distributed
        self._plan_version = 0  # counts plan rebuilds (a captured step graph belongs to one plan)
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
        settings.check_listed_once(group["params"])
        settings.check_group_keys(group)
        parts = self._split_by_ndim(group) if "use_muon" not in group else [group]
        count = len(self.param_groups)
        try:
            for part in parts:
                self._add_group(part)
        except BaseException:
            del self.param_groups[count:]
            for index in range(count, count + len(parts)):
                self._validated.pop(index, None)
            raise

    def _add_group(self, group: dict[str, Any]) -> None:
        if self._graph is not None:
            tensors = [item[1] if isinstance(item, tuple) else item for item in group["params"]]
            labels = {"param_names": [item[0] for item in group["params"] if isinstance(item, tuple)]}
            for i, p in enumerate(tensors):
                if p.device.type != "cuda":
                    raise ValueError(f"cuda_graph=True captures CUDA kernels, but parameter "
                                     f"{settings.label(labels, i, p)} is on {p.device}; pass cuda_graph=False")
        if group["use_muon"]:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            settings.check_muon_settings(group)
            check_params(group, [p[1] if isinstance(p, tuple) else p for p in group["params"]],
                         [p[0] for p in group["params"] if isinstance(p, tuple)])
        else:
            for key in ADAMW_KEYS:
                group.setdefault(key, self._adamw_defaults[key])
            for key, value in ADAMW_FLAGS.items():
                group.setdefault(key, value)
            group.setdefault("capturable", self.defaults["capturable"])
            settings.check_adamw_group(group)
        given = set(group)
        super().add_param_group(group)
        group = self.param_groups[-1]
        if not group["use_muon"]:  # torch filled in the Muon defaults: an AdamW group holds AdamW's keys
            for key in (group.keys() - given) & self.defaults.keys():  # (and any it was given), not a
                del group[key]  # momentum it does not use
        # Checked just now; the record also fixes the group's kind (settings.check_changed_groups).
        self._validated[len(self.param_groups) - 1] = (group, settings.settings_key(group))

    def _split_by_ndim(self, group: dict) -> list[dict]:
        """A group without ``use_muon``: matrices (ndim >= 2) to Muon, the rest to AdamW."""
        muon = {**group, "params": [], "use_muon": True}
        rest = {k: v for k, v in group.items() if k not in ("lr", "eps", "weight_decay")}
        rest.update(params=[], use_muon=False)
        names = group.get("param_names")  # given as a key (groups copied from another optimizer): split alike
        parallel = isinstance(names, (list, tuple)) and len(names) == len(group["params"])
        if parallel:
            muon["param_names"], rest["param_names"] = [], []
        for i, item in enumerate(group["params"]):
            p = item[1] if isinstance(item, tuple) else item
            part = muon if p.ndim >= 2 else rest
            part["params"].append(item)
            if parallel:
                part["param_names"].append(names[i])
        # An empty group stays one (Muon) group, as torch keeps it: later groups keep their indices.
        return [part for part in (muon, rest) if part["params"]] or [muon]

    # ------------------------------------------------------------------ copies
    # What a copy keeps besides torch's defaults, state and groups: the constructor's options. The
    # plan, measured choices, side streams and a captured graph are rebuilt by the copy's first step.
    # ``_validated`` too: each group's last checked settings, which also fix its kind.
    _OPTIONS = ("max_workspace_bytes", "dispatch", "overlap_adamw", "distributed", "process_group", "_adamw_defaults",
                "_validated")

    def __getstate__(self) -> dict[str, Any]:
        """copy.deepcopy, pickle and torch.save of the optimizer (torch's keeps only defaults, state
        and param_groups, which would leave a copy that cannot step)."""
        if self.process_group is not None:
            raise TypeError("a Muon with a process_group cannot be copied or pickled (a process group is a live "
                            "communicator): save opt.state_dict() and load it into a Muon built with the group")
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._OPTIONS}, cuda_graph=self._graph is not None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by torch's load_state_dict with state and param_groups only: then nothing else
        is touched."""
        state = dict(state)
        cuda_graph = state.pop("cuda_graph", None)
        super().__setstate__(state)
        if cuda_graph is not None:  # an unpickled or copied optimizer: its caches start empty
            self._graph = graphs.StepGraph() if cuda_graph else None
            self._side_streams, self._buckets, self._placements = {}, [], []
            # a copy pickled before the records were kept, or when they were the settings keys alone
            validated = self.__dict__.get("_validated", {})
            self._validated = {gi: record if isinstance(record[0], dict) else (self.param_groups[gi], record)
                               for gi, record in validated.items() if gi < len(self.param_groups)}
            self._plan_key, self._plan_version = None, 0

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def _hooks_held(self, *names: str):
        """torch's own method runs without the hooks ``names`` (attributes of Optimizer): ours runs
        them around our additions, where torch runs them around its own work.
        The swap is made, used and undone under a per-optimizer lock: a thread starting while another
        holds the hooks would take the empty dicts for the hooks and put them back for good. An RLock,
        as a hook torch runs in there may call state_dict() itself. It is made on first use (setdefault:
        atomic, so two threads get the same one), not kept by a copy or pickle (__getstate__)."""
        with self.__dict__.setdefault("_hooks_lock", threading.RLock()):
            held = {name: getattr(self, name) for name in names}
            for name in names:
                setattr(self, name, {})
            try:
                yield held
            finally:
                for name, hooks in held.items():
                    setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, readable by torch.optim.Muon and torch.distributed's checkpoint utilities
        (muon_kernels/checkpoint.py). Post-hooks see (and may replace) the dict that is returned."""
        with self._hooks_held("_optimizer_state_dict_post_hooks") as held:
            state = super().state_dict()
        checkpoint.portable_groups(state["param_groups"])
        for hook in held["_optimizer_state_dict_post_hooks"].values():
            returned = hook(self, state)
            state = state if returned is None else returned
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Accepts ours and torch.optim.Muon's; keys an older state_dict lacks keep this optimizer's values.
        A saved state tensor whose shape does not fit its parameter raises ValueError before anything
        is loaded. Load hooks run as torch runs them: the pre-hooks first (a dict one returns is the one
        loaded and checked), the post-hooks last."""
        state_dict = dict(state_dict)  # as torch: a hook editing it in place leaves the caller's dict alone
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = hook(self, state_dict)
            state_dict = state_dict if returned is None else returned
        state_dict = dict(state_dict)
        saved_groups = checkpoint.saved_groups(self.param_groups, state_dict)
        state_dict["param_groups"] = saved_groups
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks") as held:
            super().load_state_dict(state_dict)
        checkpoint.restore_state_dtypes(self.param_groups, saved_groups, state_dict["state"], self.state)
        self._plan_key = None
        # torch made new group dicts, checked by saved_groups as a step checks them: their records
        # (which also fix each group's kind) are made now.
        self._validated = {gi: (g, settings.settings_key(g)) for gi, g in enumerate(self.param_groups)}
        for hook in held["_optimizer_load_state_dict_post_hooks"].values():
            hook(self)

    # ------------------------------------------------------------------ plan
    def _plan_key_of(self, work: list[tuple[int, dict, list[torch.Tensor]]]) -> tuple:
        """What the plan of this step's Muon parameters depends on: the plan settings, each
        parameter's identity, dtype, device and shape, the process group and the workspace cap."""
        return tuple(
            (gi, *(settings.freeze(group[k]) for k in settings.PLAN_KEYS),
             tuple((id(p), p.dtype, p.device, p.shape) for p in params))
            for gi, group, params in work
        ) + (id(self._replicated()), self.max_workspace_bytes)

    def _plan_buckets(self, work: list[tuple[int, dict, list[torch.Tensor]]], key: tuple | None = None,
                      rebuild: bool = False):
        """The buckets of this step's Muon parameters and their placements, rebuilt only where
        ``rebuild``: the step passes its plan ``key`` and its decision (its key changed, or another
        rank rebuilds); without a key, the key is computed and compared with the last plan's. The step
        hands both on as locals, never reading them back from ``self``: under
        ``torch.compile(opt.step)`` Dynamo (torch 2.13) drops attribute writes on an optimizer made
        in a compiled frame, so a frame resumed after a graph break would read a stale plan."""
        if key is None:  # (the step passes its key, already compared: ``rebuild``)
            key = self._plan_key_of(work)
            rebuild = rebuild or key != self._plan_key
        if rebuild:  # (a parameter's shape is in the key: its momentum must still fit it)
            checkpoint.check_state_fits([p for _, _, params in work for p in params], self.state, "momentum_buffer",
                                        lambda: settings.names(self.param_groups))
            items = []
            for gi, group, params in work:  # a setting that does not fit a parameter, named with its group
                try:
                    items += group_items(gi, group, params)
                except ValueError as exc:
                    raise ValueError(f"param group {gi}: {exc}; nothing was modified") from None
            checkpoint.check_state_settings(items, self.state, lambda: settings.names(self.param_groups))
            buckets = build_buckets(items)
            placements = dist_muon.place(buckets, settings.names(self.param_groups), self._replicated(),
                                         verify=[settings.settings_key(g, portable=True) for g in self.param_groups])
            buckets, placements = self._within_cap(buckets, placements)
            measured.resolve(buckets, placements, self.dispatch, self.max_workspace_bytes,
                             ranks_alone=dist_muon.ranks_alone(self.distributed), replayed=self._replays())
            self._buckets, self._placements = buckets, placements
            self._plan_key = key
            self._plan_version += 1
        return self._buckets, self._placements

    def _within_cap(self, buckets, placements) -> tuple[list, list]:
        """Local buckets over ``max_workspace_bytes`` as several (``Bucket.within``); a distributed
        bucket stays whole: its matrices are shared out among the ranks already."""
        pairs = [(part, placement) for bucket, placement in zip(buckets, placements)
                 for part in (bucket.within(self.max_workspace_bytes) if placement.kind == "local" else [bucket])]
        return [b for b, _ in pairs], [p for _, p in pairs]

    def _replicated(self):
        return dist_muon.replicated_group(self.distributed, self.process_group)

    def plan(self):
        """Where each parameter goes: Muon or AdamW, matrix view, backend, kernel path, and why."""
        work = [(gi, g, [p for p in g["params"] if p.numel() > 0])
                for gi, g in enumerate(self.param_groups) if g["use_muon"]]
        buckets = build_buckets([it for gi, g, ps in work for it in group_items(gi, g, ps)])
        buckets, placements = self._within_cap(buckets, dist_muon.place(buckets, settings.names(self.param_groups),
                                                                         self._replicated()))
        measured.resolve(buckets, placements, self.dispatch, self.max_workspace_bytes, collectives=False,
                         ranks_alone=dist_muon.ranks_alone(self.distributed), replayed=self._replays())
        return describe(self.param_groups, buckets, [(p.kind, p.owners) for p in placements])

    # ------------------------------------------------------------------ step
    def _device_step(self, work: list[tuple[int, dict, list[torch.Tensor]]], buckets, placements) -> None:
        """Everything a step does on the device, after validation and planning (the part
        ``cuda_graph=True`` captures). AdamW runs on a side stream beside the Muon half where
        ``overlap_adamw`` and a CUDA device make that possible."""
        momentum_precision.advance_steps(buckets, self.state)
        adamw = [(group, params) for _, group, params in work if not group["use_muon"] and params]
        side = self._adamw_stream(adamw, buckets)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))  # AdamW reads what the caller wrote
        try:
            with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
                for group, params in adamw:
                    adamw_step(group, params, self.state)
            self._muon_half(buckets, placements)
        finally:
            if side is not None:
                # The caller's stream waits for AdamW before anything after the step (a read of the
                # parameters, a free of the gradients) runs — also when the step raised (a capture's
                # fork must be joined, and a caller that catches the error may free the gradients
                # AdamW reads); every tensor AdamW touched was allocated on that stream or stays on
                # the side stream, so the caching allocator needs no record_stream.
                torch.cuda.current_stream(side.device).wait_stream(side)

    def _muon_half(self, buckets, placements) -> None:
        """Momentum, Newton–Schulz and the update of every bucket."""
        # Collectives are started in the same order on every rank: sharded gathers, replicated
        # gathers, sharded scatters; local work and later buckets' Newton–Schulz overlap them.
        gathers, replicated = [], []
        for bucket, placement in zip(buckets, placements):
            steps = placement.shard or bucket  # an FSDP2 rank steps its rows of each matrix
            bufs = [e.piece(momentum_precision.momentum_buffer(self.state, e.param, self.param_groups[e.group]))
                    for e in steps.entries]
            grads = [e.piece(e.param.grad) for e in steps.entries]
            stack = steps.momentum_stack(grads, bufs, self.param_groups, self.state)
            if placement.kind == "sharded":
                gathers.append((bucket, placement, dist_muon.start_sharded_gather(bucket, placement, stack)))
            elif placement.kind == "replicated":
                replicated.append((bucket, dist_muon.start_replicated(bucket, placement.owners, placement.group, stack,
                                                                      self.max_workspace_bytes)))
            else:
                bucket.apply_update(bucket.orthogonalize(stack, self.max_workspace_bytes, consume=True),
                                    self.param_groups, self.state)
            del stack  # not held while the next bucket allocates its own (nor its update, above)
        scatters = [(bucket, placement, dist_muon.start_sharded_scatter(bucket, placement.owners, placement.group,
                                                                        gathered, self.max_workspace_bytes))
                    for bucket, placement, gathered in gathers]
        for bucket, handle in replicated:
            bucket.apply_update(dist_muon.finish_replicated(handle), self.param_groups, self.state)
        for bucket, placement, handle in scatters:
            dist_muon.finish_sharded(bucket, placement, handle, self.param_groups, self.state)

    def _replays(self) -> bool:
        """Whether steps are replayed from a CUDA graph (what the measured dispatch times): with
        ``cuda_graph=True``, until a capture has failed (every step eager from then on)."""
        return self._graph is not None and not self._graph.failed

    def _adamw_stream(self, adamw: list, buckets) -> torch.cuda.Stream | None:
        """The side stream for the AdamW half: when overlapping is on, there is Muon work to overlap,
        and every AdamW parameter is on one CUDA device — not while torch.compile traces the step
        (Dynamo's support for making and switching streams inside a traced frame varies by torch
        version; AdamW on the caller's stream gives the same bits)."""
        if not (self.overlap_adamw and adamw and buckets) or torch.compiler.is_compiling():
            return None
        devices = {p.device for _, params in adamw for p in params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return None
        device = next(iter(devices))
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    def _graph_key(self, work: list[tuple[int, dict, list[torch.Tensor]]], placements) -> tuple:
        """What a captured step depends on besides its state (``graphs.state_storages``, which the first,
        eager, step creates): the parameters' and gradients' storages, the group settings, the plan
        and the options that shape the captured work. A key not seen before is checked: ValueError
        where such a step cannot be captured (before the step changes anything on the device)."""
        storages = tuple([t.data_ptr() for _, _, params in work for p in params for t in (p, p.grad)])
        key = (storages, tuple([settings.settings_key(g) for g in self.param_groups]),
               (self._plan_version, self.max_workspace_bytes, self.overlap_adamw))
        if key != self._graph.checked:
            graphs.check_capturable(self.param_groups, placements, work)
            self._graph.checked = key
        return key

    def _init_variant_state(self, buckets) -> None:
        """NorMuon's v and the hyperball radii of parameters stepping for the first time, before
        anything is modified (a hyperball matrix of norm 0, NaN or inf raises here)."""
        entries = [(e.param, e.view, b.variant, e.part) for b in buckets for e in b.entries
                   if (b.variant.normuon and "normuon_v" not in self.state.get(e.param, {}))
                   or (b.variant.hyperball and "hyperball_radius" not in self.state.get(e.param, {}))]
        if entries:
            variants.init_state(entries, self.state, settings.names(self.param_groups))

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient; ``closure`` (re-evaluates the model and returns
        the loss) runs first, with gradients enabled, and its loss is returned. Every group and
        gradient is checked before anything is modified."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        settings.check_changed_groups(self.param_groups, self._validated)
        work = settings.check_grads(self.param_groups)
        muon = [w for w in work if w[1]["use_muon"] and w[2]]
        plan_key = self._plan_key_of(muon)
        rebuild = settings.check_distributed_grads(self.param_groups, self._replicated(), plan_key != self._plan_key)
        checkpoint.check_state_fits([p for _, group, params in work if not group["use_muon"] for p in params],
                                    self.state, "exp_avg", lambda: settings.names(self.param_groups), same_dtype=True)
        buckets, placements = self._plan_buckets(muon, plan_key, rebuild)
        key = None if self._graph is None else self._graph_key(work, placements)
        self._init_variant_state(buckets)
        if self._graph is None:
            self._device_step(work, buckets, placements)
        else:
            device = next((p.device for _, _, params in work for p in params), torch.device("cpu"))
            with workspace.on_device(device):  # the capture's stream and device are the parameters'
                self._graph.step(lambda: (*key, graphs.state_storages(self.state, work)),
                                 lambda: self._device_step(work, buckets, placements))
        return loss
