"""Triton kernels for muon_kernels, installed as ``muon_kernels.triton_kernels``.

Never imported as a top-level ``triton_kernels`` (another PyPI project owns that name). Importing
this package must not require a GPU: kernels are compiled lazily at first launch, and AOT-compiled
for SASS checks in the tests.
"""
