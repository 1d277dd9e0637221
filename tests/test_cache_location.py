"""Where the dispatch and autotuning caches live, and what their keys hold of the code that made a
choice (muon_kernels/cache_file.py): ``$XDG_CACHE_HOME`` is honoured, a process with no home
directory keeps its choices in memory (one warning, the step goes on), and a choice made by other
kernels — an edited or rebuilt install at the same version — is not reused."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import muon_kernels as mk
from dispatch_fakes import FakeDispatch
from muon_kernels import cache_file
from muon_kernels.backends import measured
from muon_kernels.triton_kernels import autotune
from muon_kernels.triton_kernels.config import tuning_space


def _homeless(monkeypatch):
    """A container's arbitrary user: no HOME, no passwd entry (Path.home() raises)."""
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(cache_file, "_WARNED", set())


def test_the_variable_then_xdg_then_home(monkeypatch, tmp_path):
    for variable in (measured.CACHE_ENV, autotune.CACHE_ENV):  # make gpu-check sets the dispatch cache's
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MY_CACHE", str(tmp_path / "mine.json"))
    assert cache_file.location("MY_CACHE", "dispatch.json") == tmp_path / "mine.json"
    monkeypatch.delenv("MY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file.location("MY_CACHE", "dispatch.json") == tmp_path / "xdg" / "muon_kernels" / "dispatch.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for ignored in ("", "relative/dir"):  # the XDG spec: an empty or relative value is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert cache_file.location("MY_CACHE", "x.json") == tmp_path / "home" / ".cache" / "muon_kernels" / "x.json"
    assert measured.cache_path().parent == autotune.cache_path().parent == tmp_path / "home" / ".cache" / "muon_kernels"


def test_a_first_write_makes_the_cache_directory(tmp_path):
    """~/.cache/muon_kernels need not exist (a fresh machine): the first write makes it."""
    path = tmp_path / "home" / ".cache" / "muon_kernels" / "dispatch.json"
    cache_file.update(path, {"key": {"choice": "a", "ms": {"a": 1.0}}}, lambda value: True)
    cache_file.update(path, {"other": {"choice": "b", "ms": {"b": 2.0}}}, lambda value: True)
    assert set(json.loads(path.read_text())) == {"key", "other"}


def test_no_home_directory_warns_once_and_keeps_the_dispatch_choice_in_memory(monkeypatch, dispatch_cache, tmp_path):
    monkeypatch.delenv(measured.CACHE_ENV)
    _homeless(monkeypatch)
    monkeypatch.chdir(tmp_path)
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        assert {b.backend.NAME for b in opt._buckets} == {"fast"} and fake.timed
        fake.timed.clear()
        again = mk.Muon(model.parameters(), ns_dtype=torch.float32)
        again.step()
    assert {b.backend.NAME for b in again._buckets} == {"fast"} and fake.timed == []  # this process remembers
    homeless = [w for w in caught if "no home directory" in str(w.message)]
    assert len(homeless) == 1 and "MUON_KERNELS_DISPATCH_CACHE" in str(homeless[0].message)
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere relative


def test_no_home_directory_keeps_the_tuned_config_in_memory(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    _homeless(monkeypatch)
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    space = tuning_space(90, torch.bfloat16, "ns_update")
    ran = []
    times = {cfg: 1.0 + i for i, cfg in enumerate(space)}
    times[space[-1]] = 0.5

    def bench(fn):
        fn()
        return times[ran[-1]]

    key = "ns_update|sm90|bfloat16|1024|4096|1024"
    with pytest.warns(UserWarning, match="no home directory to keep autotune.json"):
        assert autotune.tuned(key, space, ran.append, bench) == space[-1]
    assert autotune.tuned(key, space, ran.append, lambda fn: pytest.fail("tuned again")) == space[-1]


def _tree(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (root / "pkg" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF kernels")
    return root / "pkg"


def test_the_code_digest_follows_modules_and_the_extension_only(tmp_path):
    pkg = _tree(tmp_path / "one")
    base = cache_file.code_digest(pkg)
    assert base == cache_file.code_digest(_tree(tmp_path / "two"))  # the same code anywhere: the same digest
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"bytecode")
    (pkg / "crossovers.json").write_text("{}")
    assert cache_file.code_digest(pkg) == base
    for edit in (lambda: (pkg / "sub" / "b.py").write_text("y = 3\n"),
                 lambda: (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF other kernels"),
                 lambda: shutil.move(pkg / "sub" / "b.py", pkg / "b.py")):
        edit()
        assert cache_file.code_digest(pkg) != base
        base = cache_file.code_digest(pkg)


def test_both_cache_keys_hold_the_code_version(monkeypatch):
    """A development install rebuilt at the same version number measures and tunes again."""
    version = cache_file.code_version()
    assert version.startswith(f"{mk.__version__}+") and version == cache_file.code_version()
    assert version.split("+")[1] == cache_file.code_digest(Path(mk.__file__).resolve().parent)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    autotune._device_key.cache_clear()
    try:
        assert f"muon_kernels {version}" in autotune._key("symmetric", 0, torch.bfloat16, 1024, 1024, 4096)
    finally:
        autotune._device_key.cache_clear()
    param = nn.Parameter(torch.randn(16, 32))
    param.grad = torch.randn_like(param)
    opt = mk.Muon([param], ns_dtype=torch.float32, dispatch="table")
    opt.step()
    assert f"muon_kernels {version}" in measured._key(opt._buckets[0], 1, ["torch:default"])


def test_a_choice_saved_by_other_code_is_measured_again(monkeypatch, dispatch_cache):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    model = nn.Linear(16, 32)
    model.weight.grad = torch.randn_like(model.weight)
    mk.Muon([model.weight], ns_dtype=torch.float32).step()
    saved = json.loads(dispatch_cache.read_text())
    assert len(fake.timed) == 2 and all(f"muon_kernels {cache_file.code_version()}" in key for key in saved)
    measured._MEMO.clear()
    monkeypatch.setattr(cache_file, "code_version", lambda: f"{mk.__version__}+0000000000000000")
    fake.timed.clear()
    mk.Muon([model.weight], ns_dtype=torch.float32).step()
    assert len(fake.timed) == 2 and len(json.loads(dispatch_cache.read_text())) == 2
