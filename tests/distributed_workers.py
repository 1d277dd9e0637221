"""Worker processes for test_distributed.py (module level, so torch.multiprocessing can spawn them).

Each worker joins a gloo group, runs one scenario and saves what the test checks to
``<out>/rank<r>.pt``; errors are saved too, so the test can assert on every rank's message.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend

STEPS = 3


def make_model(seed: int = 0) -> nn.Module:
    """Buckets of 1, 2 and 3 matrices; 63 rows (uneven over 2 ranks); a 1-row head (empty shards)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 63), nn.ReLU(),
        nn.Linear(63, 24), nn.ReLU(),
        nn.Linear(24, 24), nn.ReLU(),
        nn.Linear(24, 24), nn.ReLU(),
        nn.Linear(24, 24, bias=False), nn.ReLU(),
        nn.Linear(24, 1),
    )


def make_data(world: int, per_rank: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world * per_rank, 12, generator=g), torch.randn(world * per_rank, 1, generator=g)


def make_optimizer(model, ns_dtype, **kw):
    kw = {"weight_decay": 0.01, **kw}
    split, view = kw.pop("split_square", None), kw.pop("split_view", None)
    params = split_groups(model, split, view) if split else model.parameters()
    return mk.Muon(params, lr=0.05, adamw_lr=1e-2, ns_dtype=ns_dtype, **kw)


def split_groups(model, sizes, view=None) -> list[dict]:
    """The 24×24 weights split along their outputs (``sizes``; with ``view="transposed"`` they are
    taken as stored (in, out), so the pieces are columns), everything else whole."""
    square = [p for p in model.parameters() if p.shape == (24, 24)]
    rest = [p for p in model.parameters() if all(p is not q for q in square)]
    group = {"params": square, "split_sizes": sizes, **({"matrix_view": view} if view else {})}
    return [group, {"params": rest}]


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


# Gram NS with AOL preconditioning: the options whose recurrence differs most from the default.
GRAM_AOL = {"ns_algorithm": "gram", "ns_normalization": "aol"}
# Cautious weight decay: elementwise on each rank's local rows, so sharding must not change it.
CAUTIOUS = {"weight_decay_mode": "cautious"}
# NorMuon + hyperball: per-neuron statistics and per-matrix norms over rows that FSDP2 shards.
VARIANTS = {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0}
# Split pieces with NorMuon's per-neuron state on them. Rows (6 + 18) of each 24×24 weight, so over
# 3 ranks (8 rows each) a piece spans ranks and a rank holds rows of two pieces; with int8 momentum
# (blocks and scales per row). Columns (8 + 16, the weights taken as stored (in, out)): every rank
# holds rows of both; with bf16 stochastic rounding, whose bits a shard draws by its rows' offset.
SPLIT = {"split_square": (6, 18), "adaptive": "normuon", "momentum_dtype": "int8"}
SPLIT_COLUMNS = {"split_square": (8, 16), "split_view": "transposed", "adaptive": "normuon",
                 "momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}
# Low-precision momentum: stochastic rounding draws the same bits on every layout (a shard draws its
# rows' part of the parameter's stream); int8 blocks are replicated (DDP) only.
STOCHASTIC_BF16 = {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}
INT8 = {"momentum_dtype": "int8", "momentum_rounding": "stochastic"}
# momentum_dtype changed before step 2 ("fsdp_momentum_<name>"): every shard's buffer converted at its
# next step, the head's empty shard (0 rows) included. (options, change)
MOMENTUM_CHANGES = {"int8_to_fp32": (INT8, {"momentum_dtype": torch.float32, "momentum_rounding": "nearest"}),
                    "int8_to_bf16": (INT8, {"momentum_dtype": torch.bfloat16}),
                    "fp32_to_int8": ({}, INT8)}


def reference(world: int, ns_dtype, steps: int = STEPS, options: dict | None = None, change: dict | None = None):
    """Single process, the concatenated batch: what every distributed run must reproduce."""
    model = make_model()
    opt = make_optimizer(model, ns_dtype, **(options or {}))
    x, y = make_data(world)
    for step in range(steps):
        _change(opt, step, change)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _change(opt, step: int, change: dict | None) -> None:
    """``change`` written into the Muon group's settings before step 2 (a setting changed mid-training)."""
    if change and step == 1:
        opt.param_groups[0].update(change)


class CountMatrices:
    """Counts the matrices this process orthogonalizes (wraps the torch backend)."""

    def __init__(self):
        self.count = 0
        self._inner = torch_backend.orthogonalize
        torch_backend.orthogonalize = self

    def __call__(self, stack, config, ns_dtype, **kwargs):
        self.count += stack.shape[0]
        return self._inner(stack, config, ns_dtype, **kwargs)


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _local_batch(rank: int, world: int):
    x, y = make_data(world)
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def train_ddp(rank, world, ns_dtype, out, options=None):
    from torch.nn.parallel import DistributedDataParallel

    counter = CountMatrices()
    model = DistributedDataParallel(make_model())
    opt = make_optimizer(model.module, ns_dtype, **(options or {}))
    x, y = _local_batch(rank, world)
    for _ in range(STEPS):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return {"params": _full(model.module), "count": counter.count, "plan": str(opt.plan()),
            "state": opt.state_dict()}


def train_fsdp(rank, world, ns_dtype, out, options=None, change=None):
    from torch.distributed.device_mesh import init_device_mesh

    counter = CountMatrices()
    model = make_model()
    _shard(model, init_device_mesh("cpu", (world,)))
    opt = make_optimizer(model, ns_dtype, **(options or {}))
    x, y = _local_batch(rank, world)
    for step in range(STEPS):
        _change(opt, step, change)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters() if p.ndim == 2]
    return {"params": _full(model), "count": counter.count, "plan": str(opt.plan()),
            "momentum_is_sharded": all(type(b).__name__ == "DTensor" and b.placements == p.placements
                                       for b, p in zip(bufs, [p for p in model.parameters() if p.ndim == 2]))}


def train_fsdp_fused(rank, world, ns_dtype, out):
    """FSDP2 with backend="triton" (the CPU interpreter, tests/interpreter/): each rank's rows go
    through the fused momentum and update kernels; the torch backend's are trapped."""
    def trapped(*args, **kwargs):
        raise AssertionError("an FSDP2 shard took the torch momentum/update path")

    torch_backend.momentum_stack = torch_backend.apply_update = trapped
    return train_fsdp(rank, world, ns_dtype, out, {"backend": "triton"})


class _Patch:
    """monkeypatch's setattr for FakeDispatch in a worker (no pytest fixture there; the process ends)."""

    @staticmethod
    def setattr(obj, name, value):
        setattr(obj, name, value)


def measured_dispatch(rank, world, ns_dtype, out, ms=None):
    """backend="auto" measuring under DDP with stand-in backends (tests/dispatch_fakes.py) whose
    made-up times disagree between ranks (``ms``: per rank, each rank's candidates and times); each
    rank has its own cache file."""
    from torch.nn.parallel import DistributedDataParallel

    from dispatch_fakes import FakeDispatch
    from muon_kernels.backends import measured

    os.environ[measured.CACHE_ENV] = os.path.join(out, f"dispatch-rank{rank}.json")
    ms = ms or [{"fast": 1.0, "slow": 2.0}, {"fast": 2.0, "slow": 1.0}]
    fake = FakeDispatch(_Patch, ms[rank])
    model = DistributedDataParallel(make_model())
    opt = make_optimizer(model.module, ns_dtype)
    x, y = _local_batch(rank, world)
    for _ in range(STEPS):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return {"params": _full(model.module), "chosen": [b.backend.NAME for b in opt._buckets], "timed": fake.timed}


def measured_dispatch_other_candidates(rank, world, ns_dtype, out):
    """Rank 1 lists other candidates than rank 0, in another order (another GPU model or install)."""
    return measured_dispatch(rank, world, ns_dtype, out, [{"fast": 1.0, "slow": 2.0}, {"other": 0.5, "fast": 2.0}])


def _measured_alone(rank, out, dispatch):
    """distributed="off" on every rank (each steps the same model on its own), stand-in backends whose
    made-up times disagree between ranks, each rank with its own cache file."""
    from dispatch_fakes import FakeDispatch
    from muon_kernels.backends import measured

    os.environ[measured.CACHE_ENV] = os.path.join(out, f"dispatch-alone-rank{rank}.json")
    fake = FakeDispatch(_Patch, {"fast": 1.0, "slow": 2.0} if rank == 0 else {"fast": 2.0, "slow": 1.0})
    model = make_model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32, distributed="off", dispatch=dispatch)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return {"chosen": [b.backend.NAME for b in opt._buckets], "timed": fake.timed,
            "why": [b.why for b in opt._buckets]}


def measured_alone_auto(rank, world, ns_dtype, out):
    return _measured_alone(rank, out, "auto")


def measured_alone_measure(rank, world, ns_dtype, out):
    return _measured_alone(rank, out, "measure")


def fsdp_resume(rank, world, ns_dtype, out, optimizer_options=None, sharded=False):
    """Train 2 steps, checkpoint model + optimizer, restore them into fresh objects, train 2 more;
    compare with 4 uninterrupted steps. The checkpoint: full state dicts in memory, or (``sharded``)
    each rank's shards written to files by torch.distributed.checkpoint and read back into the fresh
    objects' own state dicts, as a sharded FSDP2 checkpoint is used."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    x, y = _local_batch(rank, world)

    def fresh():
        model = make_model()
        _shard(model, mesh)
        return model, make_optimizer(model, ns_dtype, **(optimizer_options or {}))

    def run(model, opt, steps):
        for _ in range(steps):
            loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()

    model, opt = fresh()
    run(model, opt, 4)
    straight = _full(model)

    model, opt = fresh()
    run(model, opt, 2)
    options = StateDictOptions(full_state_dict=not sharded)
    saved = {"model": get_model_state_dict(model, options=options),
             "optim": get_optimizer_state_dict(model, opt, options=options)}
    model2, opt2 = fresh()
    if sharded:
        path = os.path.join(out, "checkpoint")
        dcp.save(saved, checkpoint_id=path)
        # The fresh objects' own (sharded) state dicts, filled in place from the files.
        saved = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(saved, checkpoint_id=path)
    set_model_state_dict(model2, saved["model"], options=options)
    set_optimizer_state_dict(model2, opt2, saved["optim"], options=options)
    run(model2, opt2, 2)
    return {"straight": straight, "resumed": _full(model2)}


def grad_missing_on_one_rank(rank, world, ns_dtype, out):
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = make_optimizer(model, ns_dtype)
    x, y = _local_batch(rank, world)
    loss_fn(ddp, x, y).backward()
    if rank == 1:
        model[2].weight.grad = None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        opt.step()
        error = None
    except RuntimeError as e:
        error = str(e)
    unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters()) and not opt.state
    # A grad that is None everywhere is skipped everywhere (no hang).
    for p in model.parameters():
        p.grad = None if p is model[2].weight else torch.ones_like(p)
    opt.step()
    # A zero-size Muon parameter carries nothing to agree on: a gradient on one rank only is no error.
    empty, square = nn.Parameter(torch.zeros(0, 8)), nn.Parameter(torch.eye(8))
    other = mk.Muon([empty, square], lr=0.05, ns_dtype=ns_dtype)
    empty.grad, square.grad = (torch.zeros(0, 8) if rank == 0 else None), torch.ones(8, 8)
    other.step()
    return {"error": error, "unchanged": unchanged, "empty_stepped": not torch.equal(square, torch.eye(8))}


def foreign_process_group(rank, world, ns_dtype, out):
    group = dist.new_group([0])
    try:
        make_optimizer(make_model(), ns_dtype, process_group=group)
        error = None
    except ValueError as e:
        error = str(e)
    return {"error": error}


def group_without_a_cpu_backend(rank, world, ns_dtype, out):
    """CPU parameters replicated over a group with no backend for CPU tensors ("cuda:gloo", as NCCL
    alone): refused at the first step on every rank, before any collective, nothing modified."""
    group = dist.new_group(backend="cuda:gloo")
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, ns_dtype, process_group=group)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        error = None
    except ValueError as e:
        error = str(e)
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return {"error": error, "unchanged": unchanged, "state": len(opt.state)}


def control_devices(rank, world, ns_dtype, out):
    """Where control tensors go per kind of group: the host where the group has a CPU backend, else
    the parameters' device ("meta" stands for the accelerator: a "cuda:gloo" group is the CPU
    machine's NCCL-like group, with no backend for CPU tensors)."""
    from muon_kernels.rank_agreement import control_device

    meta = torch.device("meta")
    groups = {"world": None, "gloo": dist.new_group(backend="gloo"), "cuda:gloo": dist.new_group(backend="cuda:gloo"),
              "cpu:gloo,cuda:gloo": dist.new_group(backend="cpu:gloo,cuda:gloo")}
    return {name: str(control_device(group, meta)) for name, group in groups.items()}


def unsupported_layouts(rank, world, ns_dtype, out):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    errors = {}
    x, y = _local_batch(rank, world)
    # HSDP: a 2-D mesh (Replicate, Shard(0)).
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    opt = make_optimizer(model, ns_dtype)
    loss_fn(model, x, y).backward()
    try:
        opt.step()
    except ValueError as e:
        errors["hsdp"] = str(e)
    # Two meshes (the same ranks, in another order) inside one bucket of 24×24 matrices.
    model = make_model()
    fully_shard(model[4], mesh=init_device_mesh("cpu", (world,)))
    fully_shard(model[6], mesh=DeviceMesh("cpu", list(reversed(range(world)))))
    opt = make_optimizer(nn.ModuleList([model[4], model[6]]), ns_dtype)
    for layer in (model[4], model[6]):
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
    try:
        opt.step()
    except ValueError as e:
        errors["meshes"] = str(e)
    return {"errors": errors}


def _auto_refuses(model, ns_dtype, then_off: bool = True) -> dict:
    """Step ``model`` (gradients set) with distributed="auto": the error it raises and whether the
    parameters stayed as they were; with ``then_off``, whether distributed="off" then steps them."""
    before = [p.detach().clone() for p in model.parameters()]
    try:
        make_optimizer(model, ns_dtype).step()
        error = None
    except RuntimeError as e:
        error = str(e)
    res = {"error": error, "unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters()))}
    if then_off:
        make_optimizer(model, ns_dtype, distributed="off").step()
        res["moved"] = not any(torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.ndim == 2)
    return res


def per_rank_models(rank, world, ns_dtype, out):
    """Pipeline-style: each rank owns different layers. "auto" must refuse (and touch nothing);
    "off" steps each rank's own model."""
    torch.manual_seed(rank)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(rank + 1)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return _auto_refuses(model, ns_dtype)


def same_shape_stages(rank, world, ns_dtype, out):
    """Pipeline stages of identical blocks: every rank plans the same buckets, but its parameters
    and gradients are its own. "auto" must refuse from the gradients (and touch nothing); "off"
    steps each rank's own stage."""
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return _auto_refuses(model, ns_dtype)


def different_buckets(rank, world, ns_dtype, out):
    """As many Muon parameters on every rank, bucketed differently (8×8 and 16×8 against two 8×8):
    a clear error on every rank, not collectives of different lengths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16 if rank == 0 else 8))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return _auto_refuses(model, ns_dtype, then_off=False)


def _replicated_pair(ns_dtype, **kw):
    """Two 8×8 linear layers with all-ones gradients (the same on every rank), and their optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model, make_optimizer(model, ns_dtype, **kw)


def _refused_step(model, opt, results: dict, key: str) -> None:
    """A step's error (None if it stepped) as ``results[key]``, and whether it left every parameter as it was."""
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
        results[key] = None
    except RuntimeError as e:
        results[key] = str(e)
    results[key + " unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def settings_per_rank(rank, world, ns_dtype, out):
    """The same replicated model with a setting that differs on one rank: refused, naming settings."""
    errors = {}
    for key, value in (("momentum", 0.9), ("momentum_dtype", "int8"), ("ns_steps", 3)):
        model, opt = _replicated_pair(ns_dtype, **({key: value} if rank == 1 else {}))
        _refused_step(model, opt, errors, key)
    return errors


def settings_changed_on_one_rank(rank, world, ns_dtype, out):
    """After a first step alike: a setting changed on one rank only (one that changes the plan, one
    read every step, the lr) is refused on every rank, the AdamW biases included unmoved; an
    optimizer-wide plan input changed on one rank (the workspace cap) rebuilds the plan on every
    rank instead of leaving that rank alone in the rebuild's collectives."""
    def first_step():
        model, opt = _replicated_pair(ns_dtype)
        opt.step()
        return model, opt

    results = {}
    for key, value in (("ns_steps", 3), ("nesterov", False), ("lr", 0.01)):
        model, opt = first_step()
        if rank == 1:
            opt.param_groups[0][key] = value
        _refused_step(model, opt, results, key)
    model, opt = first_step()
    if rank == 1:
        opt.param_groups.reverse()  # [AdamW, Muon]: the Muon group's index differs across the ranks
    _refused_step(model, opt, results, "reordered")
    model, opt = first_step()
    if rank == 1:
        opt.max_workspace_bytes = 1
    opt.step()
    results["plan version"] = opt._plan_version
    results["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return results


def rebuild_over_two_groups(rank, world, ns_dtype, out):
    """Three ranks, two process groups of different members: plain (replicated) matrices over all
    three, and a matrix sharded on a mesh of ranks 0 and 1 only, listed last. Rank 2 alone changes a
    plan input (the workspace cap): the replicated group's check says "rebuild", the mesh's (where no
    rank changed anything) says "no"; every rank must still rebuild, or rank 2 would run the rebuild's
    collectives alone and hang."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = DeviceMesh("cpu", [0, 1])  # made on every rank: its process group is a collective of all
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    sharded = torch.randn(16, 8)
    if rank < 2:
        params.append(nn.Parameter(distribute_tensor(sharded, mesh, [Shard(0)])))
    opt = make_optimizer(nn.ParameterList(params), ns_dtype)
    for step in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        if step == 1 and rank == 2:
            opt.max_workspace_bytes = 1
        opt.step()
    return {"plan version": opt._plan_version,
            "params": [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]}


# Option sets the layouts train with, by scenario name: "train_<ddp|fsdp>_<name>" trains with them,
# "fsdp_resume_<name>" checkpoints and resumes FSDP2 training with them (full state dicts), and
# "fsdp_sharded_resume[_<name>]" with a sharded torch.distributed.checkpoint on files.
OPTION_SETS = {"gram_aol": GRAM_AOL, "cautious": CAUTIOUS, "variants": VARIANTS, "split": SPLIT,
               "split_columns": SPLIT_COLUMNS,
               "stochastic_bf16": STOCHASTIC_BF16, "int8": INT8}


def _scenario(name: str):
    """The function a scenario name runs: a function of this module, or a layout with an option set."""
    if name in globals():
        return globals()[name]
    layout, _, options = name.removeprefix("train_").partition("_")
    if name.startswith("train_") and layout in ("ddp", "fsdp") and options in OPTION_SETS:
        train = train_ddp if layout == "ddp" else train_fsdp
        return lambda rank, world, ns_dtype, out: train(rank, world, ns_dtype, out, OPTION_SETS[options])
    if name.startswith("fsdp_momentum_"):
        options, change = MOMENTUM_CHANGES[name.removeprefix("fsdp_momentum_")]
        return lambda rank, world, ns_dtype, out: train_fsdp(rank, world, ns_dtype, out, options, change)
    if name.startswith(("fsdp_resume_", "fsdp_sharded_resume")):
        sharded, _, options = name.removeprefix("fsdp_").partition("resume")
        options = OPTION_SETS[options.removeprefix("_")] if options else None
        return lambda rank, world, ns_dtype, out: fsdp_resume(rank, world, ns_dtype, out, options, bool(sharded))
    raise KeyError(f"no distributed scenario {name!r}")


def run_scenario(rank, world, port, scenario, ns_dtype, out, environment, package):
    # The caller's environment at this call, as a spawned process would get it (the fork server's is
    # the one of its start, maybe inside another test's monkeypatch).
    os.environ.clear()
    os.environ.update(environment, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert mk.__file__ == package, f"rank {rank} runs {mk.__file__}, the test {package}"
    torch.set_num_threads(1)
    # A timeout, so a rank that fails mid-collective ends the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = _scenario(scenario)(rank, world, ns_dtype, out)
    except Exception:  # saved for the test to show, instead of a bare non-zero exit
        result = {"crash": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # A scenario's DDP wrapper sits in reference cycles (its hooks close over it), so it and the
    # reference it holds to the gloo process group would otherwise die in the interpreter's final
    # collection, after destroy_process_group: the group's worker threads are then destroyed
    # while joinable, std::terminate, SIGABRT ("terminate called without an active exception"),
    # a rare failure of whichever test's rank happened to exit that way. Collect them now, while
    # the group is alive, then tear it down after every rank is done with it.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


# Ranks start from a fork server that imported torch, FSDP2, torch.distributed.checkpoint and this
# module once per test process. Spawned ranks imported them anew (about 3 CPU-seconds per rank on
# CI's 2 cores, 2–3 ranks per test, ~50 tests: most of their CPU time); a plain fork would give
# each rank the test process's threads and, on a GPU machine, its CUDA context.
_SERVER_PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
                   "torch.distributed.device_mesh", "torch.distributed.fsdp", "torch.nn.parallel", "muon_kernels",
                   __name__]


def _start_fork_server() -> None:
    """Python before 3.12.8 starts the fork server with its working directory first on its path and
    ignores the caller's sys.path (CPython gh-117378), so it could preload another muon_kernels than
    the test's (the source tree's, which has no triton_kernels or _C, or the installed one) and skip
    this module without a word. It starts in this directory with the caller's path as PYTHONPATH."""
    multiprocessing.set_forkserver_preload(_SERVER_PRELOAD)
    cwd, python_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path)  # "" is the cwd
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.chdir(cwd)
        if python_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = python_path


def spawn(tmp_path, scenario: str, world: int, ns_dtype=torch.float32) -> list[dict]:
    """Run ``scenario`` on ``world`` gloo processes; every rank's saved result (a crash fails here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _start_fork_server()
    args = (world, port, scenario, ns_dtype, str(tmp_path), dict(os.environ), mk.__file__)
    torch.multiprocessing.start_processes(run_scenario, args=args, nprocs=world, start_method="forkserver")
    results = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results
