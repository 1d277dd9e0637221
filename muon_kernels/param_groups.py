"""``param_groups(model)``: which parameters Muon orthogonalizes and which AdamW steps, with names.

Decided from the module that owns each parameter and from the layout metadata the module carries,
never from shapes alone: an embedding table and a hidden Linear, a Conv1d filter and a stack of MoE
experts, a weight stored (out, in) and one stored (in, out) can all have the same shape.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import splits

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
# The note plan() shows when neither head= nor the model names an output head.
NO_HEAD_NOTE = ("no output head identified: the model has no get_output_embeddings() and head= was not given; "
                "if the model ends in a Linear onto the outputs, pass head=<its name> so AdamW steps it")


def _transformers_conv1d():
    """transformers' Conv1D class (a Linear stored (in, out)) if transformers is loaded; never imported here."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _head_modules(model: nn.Module, head) -> tuple[dict[int, str], list[str]]:
    """{id(param): why} for every parameter under the output head, and notes for plan()."""
    if head is None:
        get = getattr(model, "get_output_embeddings", None)
        found = get() if callable(get) else None
        if found is None:
            return {}, [NO_HEAD_NOTE]
        heads = [found]
    else:
        heads = list(head) if isinstance(head, (list, tuple)) else [head]
    modules = dict(model.named_modules())
    out: dict[int, str] = {}
    for h in heads:
        if isinstance(h, str):
            if h not in modules:
                raise ValueError(f"head={h!r} is not the name of a submodule of the model")
            h = modules[h]
        if not isinstance(h, nn.Module):
            raise ValueError(f"head={h!r} is neither a module nor the name of a submodule of the model")
        for p in h.parameters():  # a container head covers every parameter under it
            out[id(p)] = "output head"
    return out, []


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and module.groups == module.in_channels


# A parameter a module registers itself (not a layer's ``weight``) whose name says it is a learned
# token or position table: ViT's cls_token / position_embeddings (1, N, d), open_clip's
# positional_embedding (N, d), Swin's relative_position_bias_table. Their shapes look like matrices
# or expert stacks, but they are embeddings.
_EMBEDDING_NAMES = ("embed", "token", "position", "pos_", "bias_table")


def _route(module: nn.Module, pname: str, p, conv1d_cls) -> tuple[str, str]:
    """(group, why) for a parameter that is neither an embedding, a head nor tied to either."""
    key, why = _layout(module, pname, p, conv1d_cls)
    if key == "adamw":
        return key, why
    sides = p.shape[1:] if key in ("batch", "batch_transposed") else (p.shape[0], p.numel() // max(p.shape[0], 1))
    if min(sides) == 1:
        # Its polar factor is g/‖g‖ (normalized SGD): AdamW's per-coordinate steps suit a vector —
        # weight norm's magnitudes (out, 1, …), nn.MultiheadAttention's bias_k (1, 1, E), Linear(d, 1).
        return "adamw", f"a vector stored as {'×'.join(map(str, p.shape))} ({why}: {'×'.join(map(str, sides))})"
    return key, why


def _layout(module: nn.Module, pname: str, p, conv1d_cls) -> tuple[str, str]:
    """(group, why) from the module's type and the parameter's name and ndim."""
    if pname == "bias" or pname.endswith("_bias") or pname.startswith("bias_"):  # MHA's bias_k, bias_v
        return "adamw", "bias"
    if pname != "weight" and any(word in pname.lower() for word in _EMBEDDING_NAMES):
        return "adamw", f"learned token / position table ({pname})"
    if p.ndim < 2:
        kind = "norm" if "norm" in type(module).__name__.lower() else f"{p.ndim}-D parameter"
        return "adamw", kind
    if _depthwise(module):
        return "adamw", f"depthwise conv ({'×'.join(map(str, p.shape))}): per-channel filters, not one matrix"
    if p.ndim == 2:
        if conv1d_cls is not None and isinstance(module, conv1d_cls):
            return "transposed", "Conv1D stored (in, out)"
        return "plain", "matrix (out, in)"
    if isinstance(module, _CONV):
        if isinstance(module, _CONV_TRANSPOSED):
            # Stored (in, out/groups, k…) and flattened as stored: the filter of the adjoint
            # convolution, whose polar factor is the same tensor; the lr scale and NorMuon's neurons
            # follow the stored rows (in), as in every Muon that flattens conv filters.
            return "flatten", "transposed-conv filter (in, out, k…)"
        return "flatten", "conv filter"
    if p.ndim == 3:
        if getattr(module, "is_transposed", None) is True:  # transformers' fused experts say so
            return "batch_transposed", "experts (E, in, out)"
        return "batch", "experts / stacked matrices (E, out, in)"
    return "flatten", f"{p.ndim}-D tensor, flattened"


_GROUP_KEYS = {
    "plain": {"use_muon": True},
    "transposed": {"use_muon": True, "matrix_view": "transposed"},
    "flatten": {"use_muon": True, "matrix_view": "flatten"},
    "batch": {"use_muon": True, "matrix_view": "batch"},
    "batch_transposed": {"use_muon": True, "matrix_view": "batch_transposed"},
    "adamw": {"use_muon": False},
}


def _memory(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, one past the last byte) that ``t`` spans; None where it has no
    memory to compare (meta tensors, empty ones)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    base = t.untyped_storage().data_ptr()
    start = base + t.storage_offset() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return base, start, start + (last + 1) * t.element_size()


def _sharing(p: torch.Tensor, spans: list[tuple[tuple[int, int, int] | None, str]]) -> str | None:
    """The name of the first of ``spans`` (memory span, name) whose memory ``p`` overlaps, else None."""
    mine = _memory(p)
    if mine is None:
        return None
    return next((name for span, name in spans
                 if span is not None and span[0] == mine[0] and span[1] < mine[2] and mine[1] < span[2]), None)


def param_groups(model: nn.Module, *, head=None) -> list[dict]:
    """Split ``model``'s trainable parameters into named Muon and AdamW groups for ``Muon(...)``.

    Muon: hidden ``Linear`` weights and other 2D matrices (transformers' ``Conv1D``, stored
    (in, out), with ``matrix_view="transposed"`` so its lr scale uses (out, in)); conv filters
    (``"flatten"``); 3D parameters of other modules as stacks of matrices (``"batch"``, or
    ``"batch_transposed"`` where the module says ``is_transposed=True``, as transformers' fused
    (E, in, out) experts do); 4D+ non-conv tensors, flattened.
    Fused projections whose layout the module states — ``nn.MultiheadAttention.in_proj_weight``
    (q|k|v stacked) and transformers' GPT-2 ``c_attn`` (q|k|v, or k|v for cross-attention) — go to
    their own group with ``split_sizes``, so each block is orthogonalized on its own; other likely
    fused projections stay whole, and their reason in ``plan()`` says so.
    AdamW: embeddings, and parameters a module registers itself whose name says they are learned
    tokens or position tables (``cls_token``, ``position_embeddings``, ``*bias_table``); the output
    head (``head=`` a module, a module name, or a list of them — a container covers every parameter
    under it; by default ``model.get_output_embeddings()`` where the model has it) and any weight
    tied to an embedding; biases of any ndim (``bias``, ``*_bias``, ``bias_*``);
    norms and other vectors, vectors stored as matrices (one row or column per matrix);
    depthwise convolutions (docs/param_groups.md says why). Tensors of ``torch.nn.utils.parametrize``
    (``weight_norm``: ``<layer>.parametrizations.weight.original0/1``) are routed as the layer's
    ``weight``.
    Each parameter is passed with its name, and each group carries ``param_reasons`` (name →
    why), which ``Muon.plan()`` shows: by name, so a group split or extended by hand keeps each
    parameter's own reason. Every trainable parameter lands in exactly one group; empty groups are
    left out. Frozen parameters (``requires_grad=False``) are not included: to train one later,
    unfreeze it and add it with its name — each group of ``param_groups(submodule)``, or
    ``{"params": [(name, p)]}`` (an optimizer with named parameters refuses unnamed ones, as torch
    does).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups routes by module, so it takes the model (an nn.Module), got "
                        f"{type(model).__name__}: pass the model itself, param_groups(model)")
    heads, notes = _head_modules(model, head)
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDING)}
    embedding_memory = [(_memory(m.weight), name) for name, m in model.named_modules() if isinstance(m, _EMBEDDING)]
    conv1d_cls = _transformers_conv1d()
    groups: dict[str, dict] = {k: {"params": [], "param_reasons": {}, **keys} for k, keys in _GROUP_KEYS.items()}
    modules = dict(model.named_modules())
    seen: set[int] = set()
    for mname, owner in model.named_modules():
        for pname, p in owner.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            module, mname_routed, pname_routed = owner, mname, pname
            if isinstance(owner, parametrize.ParametrizationList):
                # torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal): the tensors
                # live at "<layer>.parametrizations.<name>.original[i]"; route each as <layer>.<name>
                # (a magnitude (out, 1, …) then goes to AdamW as a vector).
                layer, _, pname_routed = f".{mname}".rpartition(".parametrizations.")
                mname_routed = layer[1:]
                module = modules[mname_routed]
            if isinstance(module, _EMBEDDING):
                key, why = "adamw", "embedding"
            elif id(p) in embeddings:
                key, why = "adamw", f"output head (tied to {embeddings[id(p)]})"
            elif tied := _sharing(p, embedding_memory):
                # tied by memory, not by object (head.weight = nn.Parameter(emb.weight.data)): Muon
                # and AdamW would both step the same numbers
                key, why = "adamw", f"output head (tied to {tied}: shares its memory)"
            elif id(p) in heads:
                key, why = "adamw", heads[id(p)]
            else:
                key, why = _route(module, pname_routed, p, conv1d_cls)
                if key in ("plain", "transposed"):  # a fused projection the module states: split it
                    parent = modules.get(mname_routed.rpartition(".")[0]) if mname_routed else None
                    split, note = splits.recognise(module, parent, pname_routed, p, conv1d_cls)
                    if split is not None:
                        base, key = key, f"{key}:{sorted(split.items())}"
                        groups.setdefault(key, {"params": [], "param_reasons": {}, **_GROUP_KEYS[base], **split})
                    why = f"{why}; {note}" if note else why
            name = f"{mname}.{pname}" if mname else pname
            groups[key]["params"].append((name, p))
            groups[key]["param_reasons"][name] = why
    out = [g for g in groups.values() if g["params"]]
    if out and notes:
        out[0]["routing_notes"] = notes
    return out
