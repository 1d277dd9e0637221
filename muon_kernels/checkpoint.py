"""What ``Muon.state_dict`` writes beyond torch's packing, and what ``load_state_dict`` checks before
it replaces anything.

Written: dtype settings by name ("bfloat16": torch.distributed's checkpoint utilities only walk
tensors, numbers, strings and containers), and ``ns_steps=None`` as the count it stands for, so
torch.optim.Muon, which reads ``ns_steps`` as an int, steps from our checkpoint.

Checked: every saved state tensor has the shape this optimizer would have made for its parameter
under the settings being loaded; and at a step, that the state still fits parameters whose data a
user replaced by a tensor of another shape. A checkpoint of another model layout (a resized
embedding or bias, parameters in another order) otherwise loads silently and fails in the middle of
a later step — after the AdamW half has stepped — or, in torch's fused CPU AdamW kernel, which does
not check shapes, corrupts memory.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from typing import Any

import torch

from . import momentum_precision, settings, variants
from .plan import group_items
from .settings import DTYPE_KEYS, label, ns_config


# Beside an ``ns_steps`` saved as a count: the group's own setting (None), restored by our load so a
# checkpoint round-trips exactly — unless the saved count was changed since (torch.optim.Muon may
# have stepped and saved with another ns_steps). torch.distributed.checkpoint's flattened optimizer
# state keeps only the keys the live groups have, so through it None comes back as the count: the
# same steps, until the group's ns_coefficients change to a preset with another count.
NS_STEPS_SETTING = "ns_steps_setting"


ROUTING_KEYS = ("param_reasons", "routing_notes")  # muon_kernels.param_groups' plan() metadata


def portable_groups(groups: list[dict]) -> None:
    """``state_dict()``'s param groups, made readable by torch.optim.Muon and torch.distributed's
    checkpoint utilities (in place: torch's packing made them copies). ``param_groups()``'s routing
    reasons and notes stay out: they describe this optimizer's parameters for ``plan()`` (a load
    keeps the live ones), and torch.distributed.checkpoint would store each reason as its own item,
    once per parameter of the group with a flattened optimizer state dict."""
    for group in groups:
        for key in ROUTING_KEYS:
            group.pop(key, None)
        if group.get("use_muon") and group.get("ns_steps") is None:
            try:
                group["ns_steps"], group[NS_STEPS_SETTING] = ns_config(group).steps, None
            except ValueError:  # settings a step would refuse: saved as they are
                pass
        for key in DTYPE_KEYS:
            if isinstance(group.get(key), torch.dtype):
                group[key] = str(group[key]).removeprefix("torch.")


def restore_settings(saved: dict) -> None:
    """The inverse of ``portable_groups`` for the group settings, on a saved group about to load."""
    if NS_STEPS_SETTING in saved:
        setting = saved.pop(NS_STEPS_SETTING)
        if setting is None and saved.get("ns_steps") == ns_config({**saved, "ns_steps": None}).steps:
            saved["ns_steps"] = None


def _expected_shapes(gi: int, group: dict, saved: dict) -> dict[int, dict[str, tuple[int, ...]]]:
    """Per parameter (by id), the shape of each state tensor this optimizer would make for it under
    the saved group's settings."""
    params = group["params"]
    if not saved.get("use_muon", group["use_muon"]):
        return {id(p): dict.fromkeys(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), tuple(p.shape)) for p in params}
    shapes = {id(p): {"momentum_buffer": tuple(p.shape), "momentum_scale": momentum_precision.scale_shape(p.shape)}
              for p in params}
    merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
    for it in group_items(gi, merged, [p for p in params if p.numel() > 0]):
        shapes[id(it.param)].update(variants.expected_state_shapes(it.view, it.part, it.param))
    return shapes


def fill_empty_groups(groups: list[dict], saved_groups: list[dict]) -> list[dict]:
    """``saved_groups`` with a placeholder at each of this optimizer's empty groups, where it has
    exactly that many groups more: a checkpoint from before empty groups were kept (they were
    dropped at construction) loads into one built the same way."""
    empty = [i for i, g in enumerate(groups) if not g["params"]]
    if not empty or len(groups) - len(saved_groups) != len(empty):
        return saved_groups
    filled = list(saved_groups)
    for i in empty:
        filled.insert(i, {**{k: v for k, v in groups[i].items() if k != "params"}, "params": []})
    return filled


def saved_groups(groups: list[dict], state_dict: dict) -> list[dict]:
    """The checkpoint's param groups as they will load into ``groups``: one per group (else ValueError,
    with the recipe for a torch.optim.Muon checkpoint), keys the checkpoint lacks taken from the live
    group, settings and dtypes restored from ``portable_groups``' form, variant settings and every
    saved state tensor's shape checked. Raises before anything is loaded."""
    saved_groups = fill_empty_groups(groups, deepcopy(state_dict["param_groups"]))
    if len(saved_groups) != len(groups):
        kinds = ", ".join("Muon" if g["use_muon"] else "AdamW" for g in groups)
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
            f"{len(groups)} ({kinds}): a group given without use_muon is split at construction "
            "into a Muon group (its matrices) and an AdamW group (the rest). To go on from a torch.optim.Muon "
            "checkpoint over the matrices, build Muon(matrices, ...) and load it, then add the other "
            "parameters with add_param_group({'params': rest, 'use_muon': False}); nothing was loaded")
    for index, (current, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(f"state_dict param group {index} has {len(saved['params'])} parameters, this optimizer's "
                             f"has {len(current['params'])}: state is matched to parameters by position, so the "
                             "groups must list the same parameters in the same order (add new ones with "
                             "add_param_group after loading); nothing was loaded")
        _warn_renamed(index, current, saved)
        try:
            _merge(current, saved)
        except ValueError as exc:
            raise ValueError(f"state_dict param group {index}: {exc}; nothing was loaded") from None
    check_state_shapes(groups, saved_groups, state_dict["state"])
    return saved_groups


# Module names that wrappers insert (DDP, torch.compile, FSDP, activation checkpointing): a name with
# or without them is the same parameter.
_WRAPPER_PARTS = frozenset(("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


def _unwrapped(name: str) -> str:
    return ".".join(part for part in str(name).split(".") if part not in _WRAPPER_PARTS)


def _warn_renamed(index: int, current: dict, saved: dict) -> None:
    """State loads by position, as torch's does: where both groups carry names that disagree (wrapper
    prefixes aside), same-shape parameters listed in another order would silently swap their state
    (one of another shape is refused later, by its state's shape). The live names stay the group's:
    they describe this optimizer's parameters. torch.distributed.checkpoint hands in groups whose
    ``params`` are names, listed in the live order, with the state keyed by them: matched by name,
    whatever order the saved ``param_names`` (copied from the checkpoint) are in."""
    live, kept = current.get("param_names"), saved.get("param_names")
    if not live or not kept or len(live) != len(kept):
        return
    by_name = all(isinstance(p, str) for p in saved["params"])
    moved = [] if by_name else [i for i, (a, b) in enumerate(zip(live, kept)) if _unwrapped(a) != _unwrapped(b)]
    if moved:
        i = moved[0]
        warnings.warn(f"state_dict param group {index}: {len(moved)} parameter name(s) differ from the checkpoint's "
                      f"(position {i}: {live[i]!r} here, {kept[i]!r} saved); state loads by position, as torch's "
                      "does, so a parameter may have taken another's state: list the parameters in the saved "
                      "order", stacklevel=4)
    saved["param_names"] = live


def _torch_kind(saved: dict, live: bool) -> bool:
    """The kind of a group saved without ``use_muon`` (a torch optimizer's): AdamW where it has betas
    and no momentum (torch.optim.AdamW's, Adam's), Muon where it has momentum and no betas
    (torch.optim.Muon's), else the live group's."""
    if "betas" in saved and "momentum" not in saved:
        return False
    if "momentum" in saved and "betas" not in saved:
        return True
    return live


def _merge(current: dict, saved: dict) -> None:
    """``saved`` as it will load into the live group ``current``, checked as a step checks a group:
    the same kind (Muon or AdamW), the same variants, every setting valid. The backend stays the live
    group's: it says where this optimizer runs (a checkpoint saved on a GPU with backend="triton"
    loads into one built with backend="torch" on a CPU), not what it computes."""
    kind = saved.get("use_muon", _torch_kind(saved, current["use_muon"]))
    if not isinstance(kind, bool):
        raise ValueError(f"use_muon must be True or False, got {kind!r}")
    if kind != current["use_muon"]:
        saved_as = (f"it was saved with use_muon={kind!r}" if "use_muon" in saved else
                    "it is a torch optimizer's AdamW-style group (betas, no momentum)" if not kind else
                    "it is a torch optimizer's momentum group (momentum, no betas)")
        raise ValueError(f"{saved_as}, this optimizer's group has use_muon={current['use_muon']!r}: load it into an "
                         "optimizer whose groups are of the same kinds, in the same order")
    for key in ROUTING_KEYS:  # the live group's (an older checkpoint saved them, as a list)
        saved.pop(key, None)
    if current["use_muon"]:
        variants.check_checkpoint(saved, current)
        saved["backend"] = current["backend"]
    else:  # an older checkpoint's AdamW groups carried every Muon default
        for key in settings.MUON_SETTINGS:
            if key not in current:
                saved.pop(key, None)
    for key, value in current.items():
        saved.setdefault(key, value)
    restore_settings(saved)
    for key in DTYPE_KEYS:
        if isinstance(saved.get(key), str) and saved[key] != momentum_precision.INT8:
            dtype = getattr(torch, saved[key], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{key}={saved[key]!r} is not a torch dtype")
            saved[key] = dtype
    settings.check_muon_settings(saved) if current["use_muon"] else settings.check_adamw_group(saved)


# Muon state whose dtype is not its parameter's (None: the buffer keeps the dtype it was saved in).
_KEPT_DTYPES = {"momentum_buffer": None, "momentum_scale": torch.float32, "momentum_step": torch.int64,
                "normuon_v": torch.float32, "hyperball_radius": torch.float32}


def restore_state_dtypes(groups: list[dict], saved_groups: list[dict], saved_state: dict, state: dict) -> None:
    """After torch's load, which casts every state tensor to its parameter's dtype: a momentum buffer
    kept in another dtype (momentum_dtype=fp32 for bf16 params, int8), the int8 scales, the
    stochastic-rounding step counter and the variants' fp32 state, from the saved tensors. A buffer
    saved in another dtype than its group's momentum_dtype (changed after that parameter's last
    step) is kept as saved: that parameter's next step with a gradient converts it, as the saving
    optimizer's would have — and not at all if the setting is changed back before then."""
    for group, saved in zip(groups, saved_groups):
        if not group["use_muon"]:
            continue
        for p, pid in zip(group["params"], saved["params"]):
            for key, dtype in _KEPT_DTYPES.items():
                value = saved_state.get(pid, {}).get(key)
                if value is not None:
                    state[p][key] = value.to(device=p.device, dtype=dtype)


def check_state_shapes(groups: list[dict], saved_groups: list[dict], saved_state: dict[Any, dict]) -> None:
    """Raise ValueError, naming the group, the parameter and the state, where a saved state tensor's
    shape differs from the one its parameter needs, or an int8 momentum comes without its scales."""
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        try:
            expected = _expected_shapes(gi, group, saved)
        except ValueError as exc:  # a saved setting that does not fit a parameter (split_sizes, num_heads)
            raise ValueError(f"state_dict param group {gi}: {exc}; nothing was loaded") from None
        for i, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            buf = saved_state.get(pid, {}).get("momentum_buffer")
            if group["use_muon"] and isinstance(buf, torch.Tensor) and buf.dtype == torch.int8 \
                    and "momentum_scale" not in saved_state[pid]:
                raise ValueError(f"state_dict: param group {gi}, parameter {label(group, i, p)}: saved int8 "
                                 "'momentum_buffer' without its block scales ('momentum_scale'): the checkpoint is "
                                 "incomplete; nothing was loaded")
            for key, value in saved_state.get(pid, {}).items():
                want = expected[id(p)].get(key)
                if want is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(want):
                    raise ValueError(
                        f"state_dict: param group {gi}, parameter {label(group, i, p)}: saved {key!r} has shape "
                        f"{tuple(value.shape)}, but this parameter needs {tuple(want)}; the checkpoint was saved for "
                        "another model layout (load it into an optimizer over the same parameters, in the same "
                        "order); nothing was loaded")


def check_state_settings(items, state: dict, names) -> None:
    """Raise ValueError, when the plan is rebuilt and before the step modifies anything, where the
    variant state of a matrix about to step (``items``: plan.Item; NorMuon's v, the hyperball radii,
    for the variants its group has on) no longer has the shape its group's settings need:
    ``matrix_view``, ``split_sizes`` or ``num_heads`` changed since the state was made (a Triton
    kernel would index past the end of a shorter v). A change that keeps the shapes (a square
    matrix's view) keeps the state."""
    for it in items:
        st = state.get(it.param)
        if not st:
            continue
        expected = variants.expected_state_shapes(it.view, it.part, it.param)
        for key, on in (("normuon_v", it.variant.normuon), ("hyperball_radius", it.variant.hyperball)):
            value = st.get(key)
            if on and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(expected[key]):
                raise ValueError(
                    f"parameter {names()[id(it.param)]}: its optimizer state {key!r} has shape {tuple(value.shape)}, "
                    f"but its group's current settings (matrix_view, split_sizes, num_heads) need "
                    f"{tuple(expected[key])}: restore the setting, or reset the parameter's state (del "
                    "optimizer.state[p]); nothing was modified")


# A state key of one kind → (the key that marks the other kind's state, the other kind, this kind).
_OTHER_KIND = {"momentum_buffer": ("exp_avg", "AdamW", "Muon"), "exp_avg": ("momentum_buffer", "Muon", "AdamW")}


def _moved_between_kinds(p: torch.Tensor, key: str, names) -> None:
    marker, other, kind = _OTHER_KIND[key]
    raise ValueError(f"parameter {names()[id(p)]} is in a{'n' * (kind == 'AdamW')} {kind} group, but its optimizer "
                     f"state is {other}'s ({marker!r}): it was moved from a{'n' * (other == 'AdamW')} {other} group. "
                     f"Reset its state (del optimizer.state[p]) to start it afresh with {kind}, or move it back; "
                     "nothing was modified")


def check_state_fits(params: list[torch.Tensor], state: dict, key: str, names, same_dtype: bool = False) -> None:
    """Raise ValueError before a step modifies anything where a parameter's state ``key``
    ("momentum_buffer", AdamW's "exp_avg") no longer has its shape (its ``.data`` was replaced by a
    tensor of another shape) — or, with ``same_dtype`` (AdamW's, whose state torch keeps in the
    parameter's dtype), its dtype (the model was converted, ``model.double()``, after the state was
    made) — or where its state is the other kind's (the parameter was moved between a Muon and an
    AdamW group). ``names()``: each parameter's label by id, built only for the message. ~0.3 µs a
    parameter: a step runs it over its AdamW parameters (the Muon ones when the plan is rebuilt,
    which a parameter's new shape does)."""
    for p in params:
        st = state.get(p)
        buf = st.get(key) if st else None
        if buf is None:
            if st and _OTHER_KIND[key][0] in st:
                _moved_between_kinds(p, key, names)
            continue
        if buf.shape != p.shape:
            raise ValueError(f"parameter {names()[id(p)]}: its optimizer state {key!r} has shape "
                             f"{tuple(buf.shape)}, but the parameter now has shape {tuple(p.shape)} (its data was "
                             "replaced by a tensor of another shape?): reset its state (del optimizer.state[p]) "
                             "or restore its shape; nothing was modified")
        if same_dtype and buf.dtype != p.dtype:
            raise ValueError(f"parameter {names()[id(p)]}: its optimizer state {key!r} is {buf.dtype}, but the "
                             f"parameter is now {p.dtype} (the model was converted after the state was made): convert "
                             "the state with optimizer.load_state_dict(optimizer.state_dict()), which casts it to "
                             "each parameter's dtype, or reset it (del optimizer.state[p]); nothing was modified")
