"""Learning-rate and batch-size schedules: closed forms, resumption, validation."""

import math

import pytest
import torch

import muon_kernels as mk


def _optimizer():
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.zeros(6))
    return mk.Muon([w, b], lr=0.02, adamw_lr=3e-4, ns_dtype=torch.float32)


def _closed_form(kind, t, eta, T, W=0, r=0.0, p=1.0):
    """DESIGN.md §6 written out again, independently of muon_kernels.schedules."""
    if t < W:
        return eta * (t + 1) / W
    t, T = t - W, T - W
    t = min(t, T)
    lo = r * eta
    if kind == "constant":
        return eta
    if kind == "cosine":
        return lo + (eta - lo) * (1 + math.cos(math.pi * t / T)) / 2
    if kind == "polynomial":
        return (eta - lo) * (1 - t / T) ** p + lo
    if kind == "diminishing":
        return lo + (eta - lo) / math.sqrt(t + 1)
    raise AssertionError(kind)


def _make(kind, opt, T, **kw):
    cls = mk.schedules.LR_SCHEDULES[kind]
    return cls(opt, T, **kw)


CASES = [
    ("constant", {}), ("cosine", {}), ("cosine", {"min_lr_ratio": 0.1}), ("cosine", {"warmup_steps": 5}),
    ("polynomial", {"power": 2.0}), ("polynomial", {"power": 0.5, "warmup_steps": 3, "min_lr_ratio": 0.05}),
    ("diminishing", {}), ("diminishing", {"warmup_steps": 4}), ("constant", {"warmup_steps": 2}),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_lr_matches_closed_form_for_every_group(kind, kw):
    T = 20
    opt = _optimizer()
    sched = _make(kind, opt, T, **kw)
    etas = [0.02, 3e-4]
    assert sched.base_lrs == etas
    args = {"W": kw.get("warmup_steps", 0), "r": kw.get("min_lr_ratio", 0.0), "p": kw.get("power", 1.0)}
    for t in range(T + 5):
        for g, eta in zip(opt.param_groups, etas):
            assert g["lr"] == pytest.approx(_closed_form(kind, t, eta, T, **args), rel=1e-12, abs=0)
        opt.step()
        sched.step()


def test_chosen_values():
    opt = _optimizer()
    s = mk.CosineLR(opt, 100)
    for _ in range(50):
        opt.step(), s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-12)   # half-way: (1 + cos(π/2))/2 = 1/2
    opt = _optimizer()
    s = mk.DiminishingLR(opt)
    for _ in range(3):
        opt.step(), s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 2, rel=1e-12)  # t = 3: η/√4
    opt = _optimizer()
    s = mk.PolynomialLR(opt, 10, power=2)
    for _ in range(5):
        opt.step(), s.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-4 / 4, rel=1e-12)  # (1 - 1/2)^2


@pytest.mark.parametrize("kind,kw", CASES)
def test_state_dict_resumes_exactly(kind, kw):
    opt = _optimizer()
    sched = _make(kind, opt, 20, **kw)
    for _ in range(7):
        opt.step(), sched.step()
    saved = sched.state_dict()
    expected = []
    for _ in range(8):
        opt.step(), sched.step()
        expected.append([g["lr"] for g in opt.param_groups])

    opt2 = _optimizer()
    sched2 = _make(kind, opt2, 20, **kw)
    sched2.load_state_dict(saved)
    got = []
    for _ in range(8):
        opt2.step(), sched2.step()
        got.append([g["lr"] for g in opt2.param_groups])
    assert got == expected


@pytest.mark.parametrize("call,name", [
    (lambda o: mk.CosineLR(o, 0), "total_steps"),
    (lambda o: mk.CosineLR(o, -3), "total_steps"),
    (lambda o: mk.PolynomialLR(o, None), "total_steps"),
    (lambda o: mk.PolynomialLR(o, 10, power=0), "power"),
    (lambda o: mk.PolynomialLR(o, 10, power=-1.5), "power"),
    (lambda o: mk.CosineLR(o, 10, warmup_steps=10), "warmup_steps"),
    (lambda o: mk.CosineLR(o, 10, warmup_steps=-1), "warmup_steps"),
    (lambda o: mk.CosineLR(o, 10, min_lr_ratio=1.5), "min_lr_ratio"),
    (lambda o: mk.DiminishingLR(o, 0), "total_steps"),
])
def test_bad_lr_arguments(call, name):
    opt = _optimizer()
    before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match=name):
        call(opt)
    assert [g["lr"] for g in opt.param_groups] == before


@pytest.mark.parametrize("call,name", [
    (lambda: mk.ConstantBatchSize(0), "batch_size"),
    (lambda: mk.ExponentialBatchSize(0, 2, 5), "initial_batch_size"),
    (lambda: mk.ExponentialBatchSize(-4, 2, 5), "initial_batch_size"),
    (lambda: mk.ExponentialBatchSize(4, 1.0, 5), "growth"),
    (lambda: mk.ExponentialBatchSize(4, 0.5, 5), "growth"),
    (lambda: mk.ExponentialBatchSize(4, 2, 0), "every"),
    (lambda: mk.ExponentialBatchSize(8, 2, 5, max_batch_size=4), "max_batch_size"),
    (lambda: mk.ScheduledBatchSampler(0, mk.ConstantBatchSize(2)), "num_samples"),
    (lambda: mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2), num_steps=0), "num_steps"),
    (lambda: mk.split_batch([1, 2], 0), "max_micro_batch_size"),
])
def test_bad_batch_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_exponential_batch_sizes():
    s = mk.ExponentialBatchSize(4, 2, 3, max_batch_size=40)
    assert [s(t) for t in range(15)] == [4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 40, 40, 40]
    s = mk.ExponentialBatchSize(10, 1.5, 1)
    assert [s(t) for t in range(4)] == [10, round(15.0), round(22.5), round(33.75)]
    assert s(200) == round(10 * 1.5 ** 200)  # no cap: keeps growing


@pytest.mark.parametrize("b0, growth, every, cap", [(64, 2, 100, 4096), (64, 1.5, 1, 100), (3, 1.1, 1, 1000),
                                                  (7, 1.0001, 1, 8), (5, 2, 1, 5), (64, 2, 1, 4095)])
def test_a_capped_exponential_batch_size_stays_at_its_cap_however_late(b0, growth, every, cap):
    """b0·δ^k overflows a float past ~1024/log2(δ) growth counts (step 102,400 at δ = 2 every 100
    steps): a capped schedule raised OverflowError there, and so did a sampler resumed that late."""
    s = mk.ExponentialBatchSize(b0, growth, every, max_batch_size=cap)
    for t in range(0, 600 * every, every):
        size = b0 * growth ** (t // every)  # the formula, while it is a float
        assert s(t) == (cap if size >= cap else round(size)), t
    assert s(10**9) == cap
    sampler = mk.ScheduledBatchSampler(1000, s, seed=0)
    sampler.set_step(2000 * every)
    assert len(next(iter(sampler))) == cap


def test_an_uncapped_exponential_batch_size_beyond_a_float_says_what_to_do():
    with pytest.raises(OverflowError, match="give max_batch_size"):
        mk.ExponentialBatchSize(64, 2, 1)(5000)


def test_sampler_sizes_and_epoch_coverage():
    sched = mk.ExponentialBatchSize(3, 2, 2, max_batch_size=20)
    sampler = mk.ScheduledBatchSampler(37, sched, num_steps=12, seed=5)
    batches = list(sampler)
    assert [len(b) for b in batches] == [sched(t) for t in range(12)]
    stream = [i for b in batches for i in b]
    assert len(stream) == sampler.samples_before(12)
    for e in range(len(stream) // 37):  # every full epoch is a permutation: nothing dropped or repeated
        assert sorted(stream[37 * e:37 * (e + 1)]) == list(range(37))
    assert len(mk.ScheduledBatchSampler(37, sched, num_steps=12)) == 12


def test_sampler_resumes_exactly():
    sched = mk.ExponentialBatchSize(4, 2, 3, max_batch_size=32)
    full = list(mk.ScheduledBatchSampler(50, sched, num_steps=15, seed=1))
    first = mk.ScheduledBatchSampler(50, sched, num_steps=15, seed=1)
    it = iter(first)
    head = [next(it) for _ in range(6)]
    state = first.state_dict()
    resumed = mk.ScheduledBatchSampler(50, sched, num_steps=15, seed=99)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    by_step = mk.ScheduledBatchSampler(50, sched, num_steps=15, seed=1)
    by_step.set_step(6)
    assert len(by_step) == 9
    assert list(by_step) == full[6:]
    with pytest.raises(ValueError, match="num_samples"):
        mk.ScheduledBatchSampler(51, sched).load_state_dict(state)


def test_sampler_drives_a_dataloader():
    data = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    sampler = mk.ScheduledBatchSampler(100, mk.ExponentialBatchSize(2, 2, 1, max_batch_size=16), num_steps=6,
                                       shuffle=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_sampler=sampler)
    assert len(loader) == 6
    sizes = [x.shape[0] for (x,) in loader]
    assert sizes == [2, 4, 8, 16, 16, 16]
    assert len(loader) == 0 and list(loader) == []  # the schedule is one run of num_steps, not an epoch


def test_split_batch_accumulates_the_full_batch_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    full = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)[0]
    acc = torch.zeros_like(w)
    parts = mk.split_batch(range(23), 7)
    assert [len(p) for p, _ in parts] == [7, 7, 7, 2]
    assert sum(wt for _, wt in parts) == pytest.approx(1.0, abs=1e-15)
    for idx, weight in parts:
        acc += weight * torch.autograd.grad(((x[idx] @ w - y[idx]) ** 2).mean(), w)[0]
    torch.testing.assert_close(acc, full, rtol=1e-13, atol=0)


def _lrs(schedule, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


def test_schedule_defaults_and_boundary_settings():
    """PolynomialLR's default power is linear decay; min_lr_ratio = 1 (documented as valid) is a
    constant lr; ConstantLR needs no total_steps."""
    opt = _optimizer()
    assert _lrs(mk.PolynomialLR(opt, 10), opt, 6)[5] == pytest.approx(0.01, rel=1e-12)
    opt = _optimizer()
    assert _lrs(mk.CosineLR(opt, 10, min_lr_ratio=1.0), opt, 12) == [pytest.approx(0.02, rel=1e-12)] * 12
    opt = _optimizer()
    assert _lrs(mk.ConstantLR(opt, warmup_steps=2), opt, 4) == pytest.approx([0.01, 0.02, 0.02, 0.02], rel=1e-12)


def test_sampler_epochs_order_and_resume_edges():
    """Epoch e is randperm(seed + e); shuffle=False is index order; a resume at an epoch boundary,
    past the end, or from a fresh sampler's state continues exactly."""
    sampler = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(10), num_steps=2, seed=3)
    assert list(sampler) == [torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist()
                             for e in range(2)]
    ordered = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(5), num_steps=4, shuffle=False)
    assert [i for batch in ordered for i in batch] == list(range(10)) * 2
    full = list(mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(4), num_steps=8, seed=1))
    resumed = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(4), num_steps=8, seed=1)
    resumed.set_step(5)  # 20 samples consumed: the start of the third epoch
    assert list(resumed) == full[5:]
    past = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2), num_steps=5)
    past.set_step(8)
    assert len(past) == 0 and list(past) == []
    a = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2), num_steps=5)
    b = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2), num_steps=5)
    b.load_state_dict(a.state_dict())
    assert list(b) == list(a)


def test_sampler_refuses_a_zero_batch_and_a_mismatched_shuffle():
    with pytest.raises(ValueError, match="positive integers"):
        list(mk.ScheduledBatchSampler(10, lambda t: 0, num_steps=1))
    state = mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2)).state_dict()
    with pytest.raises(ValueError, match="shuffle"):
        mk.ScheduledBatchSampler(10, mk.ConstantBatchSize(2), shuffle=False).load_state_dict(state)
