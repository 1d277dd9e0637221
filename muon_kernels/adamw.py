"""The AdamW side of ``Muon``: groups with ``use_muon=False`` (biases, norms, embeddings, heads).

State layout is torch.optim.AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq``
with amsgrad) so checkpoints read the same; the math is torch's own functional ``adamw`` (fused
kernel where the device has one and every parameter and gradient is contiguous, foreach
otherwise; ``foreach`` and ``fused`` are not group keys). A group's ``amsgrad`` and ``maximize``
mean what they mean to torch.optim.AdamW (default False; a group given without ``use_muon`` may not
maximize, since its Muon half cannot); ``differentiable=True`` is refused (the step runs under
no_grad).
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw
from torch.optim.optimizer import _default_to_fused_or_foreach

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
# Group keys of torch.optim.AdamW honoured per group, with torch's defaults.
ADAMW_FLAGS = {"amsgrad": False, "maximize": False}


def adamw_step(group: dict, params: list[torch.Tensor], state: dict) -> None:
    """One AdamW step over the parameters of ``group`` that have gradients (validated by the caller)."""
    if not params:
        return
    # The fused kernel (where every parameter's device has one; torch.optim.AdamW's own default is
    # foreach) only over dense, contiguous parameters and gradients: it addresses every tensor as flat
    # memory, so a transposed or strided parameter or an expanded gradient would be read past its
    # end and written outside it (a review measured both on the CPU). Else torch's foreach.
    dense = all(p.is_contiguous() and p.grad.is_contiguous() for p in params)
    fused, foreach = _default_to_fused_or_foreach(params, False,
                                                  use_fused=dense and not torch.compiler.is_compiling())
    # capturable only means something (and torch only accepts it) for accelerator tensors.
    capturable = bool(group.get("capturable", False)) and not fused and params[0].device.type != "cpu"
    on_device = fused or capturable  # the fused kernel and capturable foreach read the step count on the device
    amsgrad = group.get("amsgrad", False)
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
    for p in params:
        st = state[p]
        if not st:  # made whole: an allocation that fails (an OOM, caught and retried) leaves no partial state
            made = dict(step=torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            if amsgrad:
                made["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st.update(made)
        elif on_device and st["step"].device != p.device:
            st["step"] = st["step"].to(p.device)
        # torch makes it at a parameter's first step; here also when amsgrad is turned on later
        # (where torch.optim.AdamW raises KeyError), starting from zeros
        if amsgrad and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        if amsgrad:
            max_exp_avg_sqs.append(st["max_exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    adamw(
        params,
        [p.grad for p in params],
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=foreach,
        fused=fused,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group.get("maximize", False),
        capturable=capturable,
    )
