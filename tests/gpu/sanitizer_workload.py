"""A small run of every CUDA and Triton kernel, for compute-sanitizer (tests/gpu/test_sanitizer.py)."""

import os

import torch

import muon_kernels as mk
from muon_kernels.backends import available_backends, select_backend
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels import replay

DEV = torch.device("cuda")
config = resolve_ns_config("keller", 2, 1e-7)
for name in ("triton", "cuda"):
    assert available_backends(DEV)[name][0], available_backends(DEV)[name][1]
    backend = select_backend(name, DEV)[0]
    # The one-kernel and the symmetric Triton paths, and a product with 3 tiles over a long K that
    # both backends split along K (partial slices, then the fixed-order reduction).
    for shape in ((2, 24, 40), (1, 130, 300), (1, 256, 4096)):
        for ns_dtype in (torch.bfloat16, torch.float32):
            backend.orthogonalize(torch.randn(shape, device=DEV), config, ns_dtype)
    # The plain step, and the variants' statistics and update (NorMuon + hyperball: the per-matrix
    # factors live in tensors that must outlive the update's launch; the test runs without the
    # caching allocator, so a freed one is unmapped memory).
    for variant in ({}, {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0}):
        ps = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in ((40, 24), (24, 40), (130, 300))]
        opt = mk.Muon(ps, backend=name, ns_steps=2, **variant)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
# Recorded Newton–Schulz calls replayed with fresh buffers (triton_kernels/replay.py), whose
# launchers take raw addresses: the debug fill that make gpu-check sets turns replay off, so it is
# cleared for these calls (split products included: the last shape).
os.environ.pop("MUON_KERNELS_DEBUG_FILL", None)
triton = select_backend("triton", DEV)[0]
for shape in ((2, 24, 40), (1, 130, 300), (1, 256, 4096)):
    x = torch.randn(shape, device=DEV)
    for _ in range(3):
        triton.orthogonalize(x, config, torch.bfloat16)
assert replay.plans() >= 3, replay.plans()
torch.cuda.synchronize()
print("workload done")
