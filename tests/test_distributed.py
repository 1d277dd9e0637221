"""Muon under DDP and FSDP2 on CPU with gloo, 2 and 3 processes: equal to one process on the
concatenated batch, each matrix orthogonalized once per step across the job, resumable, and clear
errors for what it cannot do."""

from __future__ import annotations

import pytest
import torch

import distributed_workers as workers

# Errors are relative to each parameter's displacement over the run. fp32 Newton–Schulz: only the
# order of the gradient all-reduce differs from one process (fp32 rounding, amplified a little by
# NS), so the bound is tight. bf16 Newton–Schulz: a gradient that differs in its last fp32 bit can
# flip a bf16 rounding, which NS amplifies along small singular directions; the bound is torch's
# own bf16 error on the same trajectory (bf16 vs fp32 NS, one process), as in DESIGN.md §5:
# 2 × that + 1e-2.
FP32_TOLERANCE = 1e-4


def _displacement_error(got: dict, want: dict, start: dict) -> dict:
    return {n: ((got[n] - want[n]).norm() / (want[n] - start[n]).norm()).item() for n in want}


def _matrices() -> int:
    return sum(1 for p in workers.make_model().parameters() if p.ndim == 2)


def _assert_matches_reference(results, world, ns_dtype, options=None, tolerance=None, change=None):
    ref = workers.reference(world, ns_dtype, options=options, change=change)
    start = {n: p.detach() for n, p in workers.make_model().named_parameters()}
    assert all((ref[n] - start[n]).norm() > 0 for n in ref)
    if tolerance is None and ns_dtype == torch.float32:
        tolerance = FP32_TOLERANCE
    elif tolerance is None:
        torch_bf16_error = _displacement_error(ref, workers.reference(world, torch.float32, options=options), start)
        tolerance = 2 * max(torch_bf16_error.values()) + 1e-2
    for r, res in enumerate(results):
        for name, err in _displacement_error(res["params"], ref, start).items():
            assert err <= tolerance, f"rank {r} {name}: {err:.2e} of its displacement > {tolerance:.2e}"
    for name in ref:
        for res in results[1:]:  # every rank ends with the same bits
            assert torch.equal(res["params"][name], results[0]["params"][name]), name


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_training_equals_one_process(tmp_path, layout, world, ns_dtype):
    results = workers.spawn(tmp_path, f"train_{layout}", world, ns_dtype)
    _assert_matches_reference(results, world, ns_dtype)
    # Each matrix orthogonalized once per step in the whole job, and every rank did a share.
    counts = [res["count"] for res in results]
    assert sum(counts) == _matrices() * workers.STEPS
    assert all(c > 0 for c in counts)
    kind = "replicated" if layout == "ddp" else "sharded"
    for r in range(world):  # the plan names the owner of each matrix
        assert f" {r} ({kind})" in results[0]["plan"]
    if layout == "fsdp":
        assert all(res["momentum_is_sharded"] for res in results)
        return
    # DDP: every rank holds the full optimizer state, so rank 0's state_dict is a complete checkpoint.
    for res in results:
        bufs = [s["momentum_buffer"] for s in res["state"]["state"].values() if "momentum_buffer" in s]
        assert len(bufs) == _matrices()
        torch.testing.assert_close(bufs, [s["momentum_buffer"] for s in results[0]["state"]["state"].values()
                                          if "momentum_buffer" in s], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_gram_aol_training_equals_one_process(tmp_path, layout):
    """Gram NS + AOL under DDP (replicated) and FSDP2 (sharded): each owner orthogonalizes whole
    matrices, so the job reproduces one process running the same options."""
    results = workers.spawn(tmp_path, f"train_{layout}_gram_aol", 2, torch.float32)
    # The model's gradients have rank <= 8 (8 samples), and unrestarted fp32 Gram NS amplifies
    # rounding in null directions (docs/newton_schulz.md): the ranks' all-reduced gradients differ
    # from one process's in the last bits, so the bound is twice the distance Gram's own rounding
    # puts between it and standard NS here (measured 1e-4 to 4e-4 of the displacement).
    start = {n: p.detach() for n, p in workers.make_model().named_parameters()}
    standard = workers.reference(2, torch.float32, options={**workers.GRAM_AOL, "ns_algorithm": "standard"})
    gram = workers.reference(2, torch.float32, options=workers.GRAM_AOL)
    tolerance = max(FP32_TOLERANCE, 2 * max(_displacement_error(gram, standard, start).values()))
    _assert_matches_reference(results, 2, torch.float32, workers.GRAM_AOL, tolerance)
    assert "Gram NS (ns_algorithm='gram'), AOL preconditioning" in results[0]["plan"]


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_cautious_weight_decay_training_equals_one_process(tmp_path, layout):
    results = workers.spawn(tmp_path, f"train_{layout}_cautious", 2, torch.float32)
    _assert_matches_reference(results, 2, torch.float32, workers.CAUTIOUS)
    assert "cautious weight decay" in results[0]["plan"]


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("world", [2, 3])
def test_variants_training_equals_one_process(tmp_path, layout, world):
    """NorMuon + hyperball: the sharded layout all-reduces the per-neuron statistics of each rank's
    rows (world 3 splits rows unevenly), so the job reproduces one process."""
    results = workers.spawn(tmp_path, f"train_{layout}_variants", world, torch.float32)
    _assert_matches_reference(results, world, torch.float32, workers.VARIANTS)
    assert "NorMuon (β2=0.95); hyperball" in results[0]["plan"]


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("options", ["split", "split_columns"])
def test_split_pieces_equal_one_process(tmp_path, layout, options):
    """Split pieces under DDP and FSDP2 over 3 ranks: FSDP2 sends each piece's owner the rows of the
    piece each rank holds (a row piece spans ranks; a column piece is a slice of every rank's rows),
    with NorMuon statistics and low-precision momentum on the pieces; the job reproduces one process."""
    results = workers.spawn(tmp_path, f"train_{layout}_{options}", 3, torch.float32)
    _assert_matches_reference(results, 3, torch.float32, getattr(workers, options.upper()))
    assert ("split 6+18" if options == "split" else "split 8+16") in results[0]["plan"]


@pytest.mark.parametrize("scenario, options", [("train_ddp_stochastic_bf16", "STOCHASTIC_BF16"),
                                               ("train_fsdp_stochastic_bf16", "STOCHASTIC_BF16"),
                                               ("train_ddp_int8", "INT8"), ("train_fsdp_int8", "INT8")])
def test_low_precision_momentum_training_equals_one_process(tmp_path, scenario, options):
    """A shard draws its rows' part of the parameter's random stream, and int8 blocks lie within
    rows (so within one rank's shard): sharded training is the one-process run."""
    results = workers.spawn(tmp_path, scenario, 2, torch.float32)
    _assert_matches_reference(results, 2, torch.float32, getattr(workers, options))
    assert "rounding" in results[0]["plan"]


@pytest.mark.parametrize("change", sorted(workers.MOMENTUM_CHANGES))
def test_momentum_dtype_changed_mid_training_under_fsdp2_equals_one_process(tmp_path, change):
    """Each rank converts its shard's buffer (int8 with its rows' scales) at the next step, a rank
    whose shard of the 1-row head is empty included: the run is the one-process run with the same change."""
    options, new = workers.MOMENTUM_CHANGES[change]
    results = workers.spawn(tmp_path, f"fsdp_momentum_{change}", 2)
    _assert_matches_reference(results, 2, torch.float32, options, change=new)


@pytest.mark.parametrize("scenario", ["fsdp_resume", "fsdp_resume_int8", "fsdp_resume_variants",
                                      "fsdp_resume_split_columns", "fsdp_sharded_resume", "fsdp_sharded_resume_int8",
                                      "fsdp_sharded_resume_variants", "fsdp_sharded_resume_split_columns",
                                      "fsdp_sharded_resume_stochastic_bf16"])
def test_fsdp2_checkpoint_resumes_identically(tmp_path, scenario):
    """Full state dicts, and sharded ones through torch.distributed.checkpoint's files (each rank saves
    its shards and loads them into a fresh optimizer's own state dict): also with int8 momentum (its
    block scales are DTensors sharded like the momentum), NorMuon + hyperball (v and the radii
    replicated), split pieces of columns and the bf16 buffer with its step counter."""
    for res in workers.spawn(tmp_path, scenario, 2):
        for name, want in res["straight"].items():
            assert torch.equal(res["resumed"][name], want), name


def test_grad_missing_on_some_ranks_is_an_error_everywhere(tmp_path):
    """Refused on every rank, nothing modified; a grad None everywhere, or that of a zero-size
    parameter on some ranks only, is not."""
    for res in workers.spawn(tmp_path, "grad_missing_on_one_rank", 2):
        assert res["error"] is not None and "1 of 2 ranks" in res["error"] and "'2.weight'" not in res["error"]
        assert res["unchanged"] and res["empty_stepped"]


def test_process_group_without_this_rank(tmp_path):
    results = workers.spawn(tmp_path, "foreign_process_group", 2)
    assert results[0]["error"] is None
    assert "does not contain this rank" in results[1]["error"]


def test_control_tensors_go_where_the_group_has_a_backend_for_them(tmp_path):
    """A group with a CPU backend takes its control tensors on the host; one without (NCCL alone,
    whether named "nccl" or "cuda:nccl"; here "cuda:gloo") on the parameters' device."""
    for res in workers.spawn(tmp_path, "control_devices", 2):
        assert res == {"world": "cpu", "gloo": "cpu", "cuda:gloo": "meta", "cpu:gloo,cuda:gloo": "cpu"}


def test_a_group_without_a_backend_for_the_parameters_device_is_refused(tmp_path):
    for res in workers.spawn(tmp_path, "group_without_a_cpu_backend", 2):
        assert res["error"] is not None and "has none for cpu tensors" in res["error"], res["error"]
        assert "(cuda:gloo)" in res["error"] and "distributed='off'" in res["error"]
        assert res["unchanged"] and res["state"] == 0


def test_unsupported_layouts_say_which(tmp_path):
    for res in workers.spawn(tmp_path, "unsupported_layouts", 2):
        assert "2-D mesh" in res["errors"]["hsdp"] and "Replicate" in res["errors"]["hsdp"]
        assert "different device meshes" in res["errors"]["meshes"]


def test_per_rank_models_need_distributed_off(tmp_path):
    for res in workers.spawn(tmp_path, "per_rank_models", 2):
        assert "distributed='off'" in res["error"] and res["unchanged"]
        assert res["moved"]


def test_same_shape_stages_are_told_apart_by_their_gradients(tmp_path):
    """Identical pipeline stages plan the same buckets; their gradients differ, and "auto" says so."""
    for res in workers.spawn(tmp_path, "same_shape_stages", 2):
        assert "gradients of the replicated Muon parameters differ across ranks" in res["error"]
        assert "distributed='off'" in res["error"] and res["unchanged"] and res["moved"]


def test_ranks_that_bucket_differently_get_an_error_not_a_hang(tmp_path):
    for res in workers.spawn(tmp_path, "different_buckets", 2):
        assert "ranks planned different Muon buckets" in res["error"] and res["unchanged"]


def test_settings_that_differ_across_ranks_are_refused(tmp_path):
    for res in workers.spawn(tmp_path, "settings_per_rank", 2):
        for key in ("momentum", "momentum_dtype", "ns_steps"):
            assert f"ranks planned different Muon settings: param group 0's '{key}' differs" in res[key], key
            assert res[key + " unchanged"], key


def test_a_setting_changed_on_one_rank_later_is_refused_on_every_rank(tmp_path):
    """Changed after the first step on one rank only, a plan setting made that rank rebuild its plan
    alone: the ranks' collectives no longer matched and hung (the other rank's AdamW half had
    stepped). Now every step agrees on the settings and on whether to rebuild."""
    results = workers.spawn(tmp_path, "settings_changed_on_one_rank", 2)
    for res in results:
        for key in ("ns_steps", "nesterov", "lr"):
            assert f"ranks planned different Muon settings: param group 0's '{key}' differs" in res[key], key
            assert res[key + " unchanged"], key
        assert "their Muon parameters are in different param groups" in res["reordered"] and res["reordered unchanged"]
        assert res["plan version"] == 2  # the workspace cap changed on rank 1 rebuilt both ranks' plans
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), name


def test_a_rebuild_on_one_rank_rebuilds_every_rank_across_process_groups(tmp_path):
    """The "rebuild" answers of several process groups are combined, not the last one taken: rank 2
    (only in the replicated group) rebuilds, so ranks 0 and 1 (also on a mesh of their own, checked
    last) must rebuild too."""
    results = workers.spawn(tmp_path, "rebuild_over_two_groups", 3)
    assert [res["plan version"] for res in results] == [2, 2, 2]
    for res in results[1:]:
        for a, b in zip(res["params"], results[0]["params"]):
            assert torch.equal(a, b)
