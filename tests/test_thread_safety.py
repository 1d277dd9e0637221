"""Optimizers used from several threads (a checkpointing thread beside the training loop, two
optimizers stepping in threads): each race is forced by running the other thread at the worst
moment, from inside the first one's critical section, so the tests are deterministic. With the
locks the other thread waits; the first one's join of it times out and it finishes first."""

from __future__ import annotations

import copy
import pickle
import threading
from collections import OrderedDict

import torch

import muon_kernels as mk
from muon_kernels.triton_kernels import fused_update

WAIT_S = 0.5  # how long the first thread lets the other one run inside its critical section


def _optimizer():
    model = torch.nn.Linear(16, 16, bias=False)
    opt = mk.Muon(model.parameters(), lr=0.01)
    model.weight.grad = torch.randn(16, 16)
    opt.step()
    return opt


def test_a_state_dict_in_another_thread_keeps_and_runs_the_hooks():
    """Our state_dict holds the post-hooks while torch's runs (and runs the pre-hooks): a second
    call then must neither run without them nor put an empty set back for good."""
    opt = _optimizer()
    ran = []
    opt.register_state_dict_post_hook(lambda o, sd: ran.append(threading.current_thread().name))
    other = threading.Thread(target=opt.state_dict, name="other")

    def run_the_other_inside(o):
        if other.ident is None:
            other.start()
            other.join(timeout=WAIT_S)

    opt.register_state_dict_pre_hook(run_the_other_inside)
    opt.state_dict()
    other.join()
    assert sorted(ran) == sorted([threading.current_thread().name, "other"])
    opt.state_dict()
    assert len(ran) == 3 and len(opt._optimizer_state_dict_post_hooks) == 1


def test_an_optimizer_copies_after_its_state_dict():
    """The hooks' lock is not copied or pickled (a lock cannot be): a copy makes its own."""
    opt = _optimizer()
    opt.state_dict()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_an_address_table_evicted_by_another_thread_during_a_lookup(monkeypatch):
    """A lookup moves its table to the LRU's end; another thread's new table must not evict it in between."""
    cpu = torch.device("cpu")
    evicting = threading.Thread(target=fused_update.int_table, args=((2,), cpu))

    class EvictedDuringLookup(OrderedDict):
        def get(self, key, default=None):
            table = super().get(key, default)
            if evicting.ident is None:
                evicting.start()  # its new table evicts the one this lookup found
                evicting.join(timeout=WAIT_S)
            return table

    monkeypatch.setattr(fused_update, "_ADDRESS_TABLES", EvictedDuringLookup())
    monkeypatch.setattr(fused_update, "_ADDRESS_TABLES_MAX", 1)
    fused_update._ADDRESS_TABLES[(cpu, (1,))] = torch.tensor([1])
    assert fused_update.int_table((1,), cpu).tolist() == [1]
    evicting.join()
    assert list(fused_update._ADDRESS_TABLES) == [(cpu, (2,))]
