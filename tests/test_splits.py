"""Splits before orthogonalization (``split_sizes``, ``num_heads``): a split parameter must step
exactly as the separate matrices it fuses would (bitwise, fp32, torch backend), each piece in the
bucket of its own shape with its own lr scale; ``param_groups`` splits only layouts a module states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk

STEPS = 3


def _grads(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(STEPS)]


def _fused_vs_separate(fused_shape, pieces, dim, options, *, stored_in_out=False, seed=0, **extra):
    """Step one fused parameter (group options ``options``) and the pieces as separate parameters
    (no split) with the same gradients; return both results."""
    g = torch.Generator().manual_seed(seed + 100)
    W0 = torch.randn(fused_shape, generator=g)
    grads = _grads(fused_shape, seed)
    view = {"matrix_view": "transposed"} if stored_in_out else {}
    fused = nn.Parameter(W0.clone())
    opt = mk.Muon([{"params": [fused], **view, **options}], lr=0.05, ns_dtype=torch.float32, backend="torch", **extra)
    separate = [nn.Parameter(t.clone()) for t in W0.split(pieces, dim=dim)]
    opt_sep = mk.Muon([{"params": separate, **view}], lr=0.05, ns_dtype=torch.float32, backend="torch", **extra)
    for G in grads:
        fused.grad = G.clone()
        for p, part in zip(separate, G.split(pieces, dim=dim)):
            p.grad = part.clone()
        opt.step()
        opt_sep.step()
    return fused.detach(), torch.cat([p.detach() for p in separate], dim=dim), opt, opt_sep


def test_qkv_split_equals_three_separate_matrices_bitwise():
    """GPT-2's (2304, 768) fused QKV as (768, 768)·3; and its pieces share the output projection's bucket."""
    d = 768
    fused, separate, opt, _ = _fused_vs_separate((3 * d, d), [d] * 3, 0, {"split_sizes": (d, d, d)})
    assert torch.equal(fused, separate)
    proj = nn.Parameter(torch.randn(d, d))
    qkv = nn.Parameter(torch.randn(3 * d, d))
    opt = mk.Muon([{"params": [qkv], "split_sizes": (d, d, d)}, {"params": [proj]}], lr=0.05)
    work = [(i, g, g["params"]) for i, g in enumerate(opt.param_groups)]
    [bucket], _ = opt._plan_buckets(work)
    assert bucket.matrices == 4 and (bucket.m, bucket.n) == (d, d)
    assert all(e.scale == 1.0 for e in bucket.entries)  # each piece scaled from (768, 768), not (2304, 768)


def test_weight_stored_in_out_splits_along_its_columns():
    """transformers' Conv1D c_attn: (d, 3d) stored (in, out), the q|k|v blocks are column blocks."""
    d = 24
    fused, separate, *_ = _fused_vs_separate((d, 3 * d), [d] * 3, 1, {"split_sizes": (d, d, d)}, stored_in_out=True)
    assert torch.equal(fused, separate)


def test_gqa_sizes_and_per_head_split():
    d, kv, heads = 32, 8, 4
    fused, separate, *_ = _fused_vs_separate((d + 2 * kv, d), [d, kv, kv], 0, {"split_sizes": (d, kv, kv)})
    assert torch.equal(fused, separate)
    fused, separate, opt, _ = _fused_vs_separate((d, 2 * d), [d // heads] * heads, 0, {"num_heads": heads})
    assert torch.equal(fused, separate)
    row = opt.plan()[0]
    assert row.view == "4 pieces: 8×64" and "4 heads" in row.why and "bucket of 4 matrices, iterated as 8×64" in row.why
    # split_sizes then num_heads: each of q, k, v cut into its heads
    fused, separate, *_ = _fused_vs_separate((3 * d, d), [d // heads] * 3 * heads, 0,
                                              {"split_sizes": (d, d, d), "num_heads": heads})
    assert torch.equal(fused, separate)


def test_normuon_on_split_pieces_equals_separate_matrices():
    d = 16
    fused, separate, opt, opt_sep = _fused_vs_separate((3 * d, d), [d] * 3, 0, {"split_sizes": (d, d, d)},
                                                       adaptive="normuon")
    assert torch.equal(fused, separate)
    [v] = [s["normuon_v"] for s in opt.state.values()]
    assert torch.equal(v, torch.cat([s["normuon_v"] for s in opt_sep.state.values()]))


def test_split_state_dict_round_trip_and_momentum_is_the_parameters():
    d = 16
    W = nn.Parameter(torch.randn(3 * d, d))
    opt = mk.Muon([{"params": [W], "split_sizes": (d, d, d)}], lr=0.05)
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["momentum_buffer"].shape == W.shape
    sd = opt.state_dict()
    assert tuple(sd["param_groups"][0]["split_sizes"]) == (d, d, d)
    other = mk.Muon([{"params": [W], "split_sizes": (d, d, d)}], lr=0.05)
    other.load_state_dict(sd)
    assert tuple(other.param_groups[0]["split_sizes"]) == (d, d, d)


@pytest.mark.parametrize("keys, message", [
    ({"split_sizes": (10, 10)}, r"parameter 'w': split_sizes \(10, 10\) sum to 20, not to its 24 outputs"),
    ({"num_heads": 5}, r"parameter 'w': num_heads=5 does not divide the piece size\(s\) \[24\]"),
    ({"split_sizes": (12, 12), "num_heads": 5}, r"num_heads=5 does not divide"),
    ({"split_sizes": (12, -12)}, r"split_sizes must be None or a non-empty tuple of positive ints"),
    ({"num_heads": 0}, r"num_heads must be None or a positive int"),
    ({"split_sizes": (24, 0)}, r"split_sizes must be None or a non-empty tuple of positive ints"),
    ({"split_sizes": (True,) * 24}, r"split_sizes must be None or a non-empty tuple of positive ints"),  # bools
    ({"num_heads": True}, r"num_heads must be None or a positive int, got True"),
])
def test_bad_splits_name_the_parameter_and_the_fix(keys, message):
    with pytest.raises(ValueError, match=message):
        mk.Muon([{"params": [("w", nn.Parameter(torch.randn(24, 8)))], **keys}])


def test_bad_split_written_into_a_group_modifies_nothing():
    W = nn.Parameter(torch.randn(24, 8))
    opt = mk.Muon([("w", W)], lr=0.05)
    W.grad = torch.randn_like(W)
    opt.step()
    before = (W.detach().clone(), opt.state[W]["momentum_buffer"].clone())
    opt.param_groups[0]["split_sizes"] = (10, 10)
    with pytest.raises(ValueError, match="sum to 20"):
        opt.step()
    assert torch.equal(W.detach(), before[0]) and torch.equal(opt.state[W]["momentum_buffer"], before[1])


def test_split_refuses_3d_and_hyperball():
    with pytest.raises(ValueError, match="parameter 'e'.*cut a 2D matrix along its outputs"):
        mk.Muon([{"params": [("e", nn.Parameter(torch.randn(2, 8, 8)))], "matrix_view": "batch",
                  "split_sizes": (4, 4)}])
    with pytest.raises(ValueError, match="hyperball.*split_sizes"):
        mk.Muon([nn.Parameter(torch.randn(8, 8))], split_sizes=(4, 4), constraint="hyperball", weight_decay=0.0)
    with pytest.raises(ValueError, match="hyperball.*num_heads"):
        mk.Muon([nn.Parameter(torch.randn(8, 8))], num_heads=2, constraint="hyperball", weight_decay=0.0)
    # a conv filter is one flattened matrix, not a stack of outputs to cut
    with pytest.raises(ValueError, match=r"parameter 'conv'.*cut a 2D matrix along its outputs.*flatten 8×18"):
        mk.Muon([{"params": [("conv", nn.Parameter(torch.randn(8, 2, 3, 3)))], "split_sizes": (4, 4)}])


def test_param_groups_splits_stated_layouts_only():
    mha = nn.TransformerEncoderLayer(32, 4, 64)
    groups = mk.param_groups(mha)
    split = [g for g in groups if g.get("split_sizes")]
    assert len(split) == 1 and split[0]["split_sizes"] == (32, 32, 32)
    assert [n for n, _ in split[0]["params"]] == ["self_attn.in_proj_weight"]

    class NeoXLike(nn.Module):  # fused, but per-head interleaved or not: nothing says which
        def __init__(self):
            super().__init__()
            self.query_key_value = nn.Linear(16, 48)

    rows = {r.name: r for r in mk.Muon(mk.param_groups(NeoXLike())).plan()}
    row = rows["query_key_value.weight"]
    assert row.view == "48×16" and "left unsplit" in row.why

    class BaichuanLike(nn.Module):  # the module's own name says it, in capitals: W_pack
        def __init__(self):
            super().__init__()
            self.W_pack = nn.Linear(16, 48, bias=False)

    assert "left unsplit" in mk.Muon(mk.param_groups(BaichuanLike())).plan()[0].why


def test_gpt2_c_attn_is_split_and_trains_like_its_blocks():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    groups = mk.param_groups(model)
    [split] = [g for g in groups if g.get("split_sizes")]
    assert split["split_sizes"] == (32, 32, 32) and split["matrix_view"] == "transposed"
    opt = mk.Muon(groups, lr=0.02)
    rows = {r.name: r for r in opt.plan()}
    assert rows["transformer.h.0.attn.c_attn.weight"].view == "3 pieces: 32×32 stored (in, out)"
    x = torch.randint(0, 64, (2, 8))
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    model(x, labels=x).loss.backward()
    opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_gpt2_cross_attention_c_attn_is_split_into_k_and_v():
    """A GPT-2 decoder with cross-attention: its crossattention.c_attn is (d, 2d) holding k|v (q_attn
    is separate), split in two; the self-attention's stays q|k|v."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                                     add_cross_attention=True)
    model = transformers.GPT2LMHeadModel(config)
    split = {n: g["split_sizes"] for g in mk.param_groups(model) if g.get("split_sizes") for n, _ in g["params"]}
    assert split == {"transformer.h.0.attn.c_attn.weight": (32, 32, 32),
                     "transformer.h.0.crossattention.c_attn.weight": (32, 32)}
    rows = {r.name: r for r in mk.Muon(mk.param_groups(model)).plan()}
    assert rows["transformer.h.0.crossattention.c_attn.weight"].view == "2 pieces: 32×32 stored (in, out)"
    assert rows["transformer.h.0.crossattention.q_attn.weight"].view == "32×32 stored (in, out)"
