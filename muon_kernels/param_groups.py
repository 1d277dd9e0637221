"""``param_groups(model)``: which parameters Muon orthogonalizes and which AdamW steps.

Decided from the module that owns each parameter, because the shape alone cannot tell an
embedding table from a hidden Linear, or a Conv1d filter from a stack of MoE experts.
"""

from __future__ import annotations

from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)


def _head_modules(model: nn.Module, head) -> set[int]:
    if head is None:
        return set()
    heads = head if isinstance(head, (list, tuple)) else [head]
    found = set()
    modules = dict(model.named_modules())
    for h in heads:
        if isinstance(h, nn.Module):
            found.add(id(h))
        elif isinstance(h, str) and h in modules:
            found.add(id(modules[h]))
        else:
            raise ValueError(f"head={h!r} is neither a module nor the name of a submodule of the model")
    return found


def param_groups(model: nn.Module, *, head=None) -> list[dict]:
    """Split ``model``'s trainable parameters into Muon and AdamW groups for ``Muon(...)``.

    Muon: hidden ``Linear`` weights and other 2D matrices; conv filters (``matrix_view="flatten"``
    on 3D Conv1d filters); 3D parameters of other modules, taken as stacks of matrices
    (``matrix_view="batch"``, MoE experts, stacked heads); 4D+ non-conv tensors, flattened.
    AdamW: embeddings, the output head (``head=`` a module, a module name, or a list of them, and any
    ``Linear`` whose weight is tied to an embedding), biases, norms and scalars.
    Every parameter lands in exactly one group; empty groups are left out.
    """
    heads = _head_modules(model, head)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDING)}
    plain, flatten, batch, adamw = [], [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if (
                p.ndim < 2
                or isinstance(module, _EMBEDDING)
                or id(module) in heads
                or id(p) in embedding_weights
            ):
                adamw.append(p)
            elif p.ndim == 2:
                plain.append(p)
            elif p.ndim == 3:
                (flatten if isinstance(module, _CONV) else batch).append(p)
            else:
                flatten.append(p)
    groups = [
        {"params": plain, "use_muon": True},
        {"params": flatten, "use_muon": True, "matrix_view": "flatten"},
        {"params": batch, "use_muon": True, "matrix_view": "batch"},
        {"params": adamw, "use_muon": False},
    ]
    return [g for g in groups if g["params"]]
