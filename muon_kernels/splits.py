"""Splits before orthogonalization: a fused projection orthogonalized as the matrices it fuses.

``split_sizes=(d, d_kv, d_kv)`` cuts each 2D parameter of the group along its output axis (rows of
an (out, in) matrix; columns of a weight stored (in, out), like transformers' Conv1D) into pieces
of those sizes; ``num_heads=h`` then cuts every piece (or the whole matrix) into h equal heads.
Each piece is a matrix of its own from there on: its own lr scale, its own bucket (a GPT-2 QKV
piece of 768×768 shares the bucket of the 768×768 output projection), and the momentum, update and
NorMuon state are the parameter's, seen through the piece (momentum and the update are elementwise,
so updating the pieces is updating the whole).

``recognise(module, pname, p)`` names the fused layouts ``param_groups`` splits on its own — only
those whose layout the module states for sure.
"""

from __future__ import annotations

import torch
from torch import nn

from .bucket import MatrixView

DEFAULTS = {"split_sizes": None, "num_heads": None}


def check_settings(group: dict) -> None:
    sizes, heads = group["split_sizes"], group["num_heads"]
    if sizes is not None and not (isinstance(sizes, (list, tuple)) and sizes
                                  and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
        raise ValueError(f"split_sizes must be None or a non-empty tuple of positive ints, got {sizes!r}")
    if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0):
        raise ValueError(f"num_heads must be None or a positive int, got {heads!r}")
    if (sizes is not None or heads is not None) and group["constraint"] == "hyperball":
        raise ValueError("constraint='hyperball' with split_sizes/num_heads is not supported (which sphere: the "
                         "parameter's or each piece's?); use one of them per param group")


def pieces(view: MatrixView, sizes, heads, name: str) -> list[tuple[tuple[int, int, int], MatrixView]]:
    """[((dim, start, size), the piece's matrix view)] for a parameter seen as ``view``; [] when the
    group splits nothing. Raises ValueError naming the parameter when the sizes do not fit."""
    if sizes is None and heads is None:
        return []
    if view.kind not in ("2d", "transposed"):
        raise ValueError(f"parameter {name}: split_sizes/num_heads cut a 2D matrix along its outputs, but this "
                         f"parameter is seen as {view.describe()}; put it in a group without them")
    stored_transposed = view.kind == "transposed"
    out = view.cols if stored_transposed else view.rows
    sizes = tuple(sizes) if sizes is not None else (out,)
    if sum(sizes) != out:
        raise ValueError(f"parameter {name}: split_sizes {sizes} sum to {sum(sizes)}, not to its {out} outputs; "
                         f"give sizes that add up to {out} (e.g. (d, d, d) for a fused QKV of width d)")
    if heads is not None:
        bad = [s for s in sizes if s % heads]
        if bad:
            raise ValueError(f"parameter {name}: num_heads={heads} does not divide the piece size(s) {bad}; use a "
                             "num_heads that divides every piece (each head gets size/num_heads outputs)")
        sizes = tuple(s // heads for s in sizes for _ in range(heads))
    dim, start, result = (1 if stored_transposed else 0), 0, []
    for size in sizes:
        shape = (view.rows, size) if stored_transposed else (size, view.cols)
        result.append(((dim, start, size), MatrixView(1, *shape, view.kind)))
        start += size
    return result


def describe(sizes, heads) -> str:
    parts = [f"split {'+'.join(map(str, sizes))}"] if sizes else []
    return ", ".join(parts + ([f"{heads} heads"] if heads else []))


# Parameter names that usually mean a fused projection whose layout the module does not state.
_FUSED_NAMES = ("qkv", "query_key_value", "in_proj", "kv_proj", "c_attn", "w_pack")


def recognise(module: nn.Module, parent: nn.Module | None, pname: str, p: torch.Tensor,
              conv1d_cls) -> tuple[dict | None, str | None]:
    """(group keys that split ``p``, why) for fused layouts known for sure; (None, why it stays
    unsplit) where a fused projection is likely but its layout is not stated (never guessed);
    (None, None) otherwise. ``parent``: the module that owns ``module`` (None at the root)."""
    if isinstance(module, nn.MultiheadAttention) and pname == "in_proj_weight":
        d = module.embed_dim
        if p.shape == (3 * d, d):
            return {"split_sizes": (d, d, d)}, "nn.MultiheadAttention in_proj_weight: q, k, v stacked (3d, d)"
    if conv1d_cls is not None and isinstance(module, conv1d_cls) and pname == "weight" and parent is not None:
        # transformers' GPT-2 family: attention.c_attn is a Conv1D (d, 3d) holding q|k|v (k|v for
        # cross-attention, where q_attn is separate), each block split_size = embed_dim wide.
        d = getattr(parent, "embed_dim", None)
        if (getattr(parent, "c_attn", None) is module and getattr(parent, "split_size", None) == d
                and isinstance(d, int) and p.shape[0] == d):
            parts = 2 if getattr(parent, "is_cross_attention", False) else 3
            if p.shape[1] == parts * d:
                return {"split_sizes": (d,) * parts}, (f"GPT-2 c_attn: {'q, k, v' if parts == 3 else 'k, v'} "
                                                       "blocks, stored (in, out)")
    if p.ndim == 2 and any(k in pname.lower() or k in _own_name(parent, module) for k in _FUSED_NAMES):
        return None, ("looks like a fused projection, but the module does not state its layout (q|k|v blocks or "
                      "per-head interleaved): left unsplit; give it split_sizes/num_heads in its own group if known")
    return None, None


def _own_name(parent: nn.Module | None, module: nn.Module) -> str:
    if parent is None:
        return ""
    return next((name.lower() for name, child in parent.named_children() if child is module), "")
