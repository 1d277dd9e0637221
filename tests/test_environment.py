"""environment.Switch reads what os.environ.get reads, after every way a test or a user changes it."""

import os

import pytest
import torch

from muon_kernels import environment, workspace

NAME = "MUON_KERNELS_TEST_SWITCH"


def test_switch_follows_os_environ(monkeypatch):
    switch = environment.Switch(NAME)
    monkeypatch.delenv(NAME, raising=False)
    assert switch.get() == "" == os.environ.get(NAME, "")
    for value in ("1", "nan", "1", "", "ünïcode", "0"):  # the same value set again, empty, non-ASCII
        monkeypatch.setenv(NAME, value)
        assert switch.get() == value == os.environ.get(NAME, "")
    os.environ[NAME] = "direct"
    assert switch.get() == "direct"
    del os.environ[NAME]
    assert switch.get() == ""


def test_switch_falls_back_when_os_environ_is_replaced(monkeypatch):
    """A plain mapping in os.environ's place (some test harnesses do this): read through .get."""
    switch = environment.Switch(NAME)
    monkeypatch.setattr(os, "environ", {NAME: "plain"})
    assert switch.get() == "plain"
    monkeypatch.setattr(os, "environ", {})
    assert switch.get() == ""


def test_debug_fill_switch_is_read_per_buffer(monkeypatch):
    buf = torch.zeros(4)
    monkeypatch.delenv(workspace.FILL_VARIABLE, raising=False)
    assert torch.equal(workspace.poisoned(buf), torch.zeros(4))  # off: a buffer is handed out as it is
    monkeypatch.setenv(workspace.FILL_VARIABLE, "nan")
    assert workspace.poisoned(buf).isnan().all()
    # integer buffers (int8 momentum temporaries, counters) have no NaN: handed out as they are
    assert workspace.empty((4,), dtype=torch.int8, device=torch.device("cpu")).dtype == torch.int8
    assert torch.equal(workspace.poisoned(torch.ones(3, dtype=torch.int32)), torch.ones(3, dtype=torch.int32))
    monkeypatch.setenv(workspace.FILL_VARIABLE, "off")
    buf.zero_()
    assert torch.equal(workspace.poisoned(buf), torch.zeros(4))
    monkeypatch.setenv(workspace.FILL_VARIABLE, "zeros")
    with pytest.raises(ValueError, match=workspace.FILL_VARIABLE):
        workspace.empty((4,), dtype=torch.float32, device=torch.device("cpu"))
