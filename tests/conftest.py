"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def dispatch_cache(tmp_path, monkeypatch):
    """backend="auto"'s measured choices go to a fresh file, and the environment forces no mode."""
    from muon_kernels.backends import measured

    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(measured.CACHE_ENV, str(path))
    monkeypatch.delenv(measured.ENV, raising=False)
    monkeypatch.setattr(measured, "_MEMO", {})  # nothing this process measured in an earlier test
    return path
