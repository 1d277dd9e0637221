"""Routing: param_groups(model), the construction-time split, matrix views and their lr scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import muon_kernels as mk
from oracles import reference_ns, rel_err


class Experts(nn.Module):
    def __init__(self, n=4, d=16, f=24):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(n, d, f) / d**0.5)
        self.gate = nn.Parameter(torch.zeros(n))


class Net(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv2 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv1d(16, 16, 5, padding=2)
        self.proj = nn.Linear(16, 16)
        self.experts = Experts()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.scale = nn.Parameter(torch.ones(()))
        if tie:
            self.head.weight = self.embed.weight


def _ids(params):
    """ids of the tensors of a params list (param_groups passes (name, tensor) pairs)."""
    return {id(p[1] if isinstance(p, tuple) else p) for p in params}


def test_routing_of_a_mixed_model():
    net = Net()
    groups = mk.param_groups(net, head="head")
    by_view = {(g["use_muon"], g.get("matrix_view")): _ids(g["params"]) for g in groups}
    assert by_view[(True, None)] == _ids([net.proj.weight])
    assert by_view[(True, "flatten")] == _ids([net.conv2.weight, net.conv1.weight])
    assert by_view[(True, "batch")] == _ids([net.experts.w_in])
    assert by_view[(False, None)] == _ids(
        [net.embed.weight, net.conv2.bias, net.conv1.bias, net.proj.bias, net.experts.gate, net.norm.weight,
         net.norm.bias, net.head.weight, net.scale]
    )
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(_ids(every)) == len(list(net.parameters()))
    names = {name for g in groups for name, _ in g["params"]}
    assert names == {name for name, _ in net.named_parameters()}
    for g in groups:
        assert set(g["param_reasons"]) == {name for name, _ in g["params"]}
    assert groups[-1]["use_muon"] is False


def test_head_by_module_and_by_tying():
    net = Net()
    assert id(net.head.weight) in _ids(mk.param_groups(net, head=net.head)[-1]["params"])
    assert id(net.head.weight) in _ids([p for g in mk.param_groups(net) if g["use_muon"] for p in g["params"]])
    tied = Net(tie=True)
    adamw = mk.param_groups(tied)[-1]
    assert id(tied.head.weight) in _ids(adamw["params"]) and not adamw["use_muon"]
    with pytest.raises(ValueError, match="head='nope' is not the name"):
        mk.param_groups(net, head="nope")


def test_a_head_tied_by_memory_goes_to_adamw_with_the_embedding():
    """head.weight = nn.Parameter(embed.weight.data) ties by memory, not by object: Muon and AdamW
    would both step the same numbers. A view into part of the table counts too; a parameter beside
    it in another tensor does not."""
    net = Net()
    net.head.weight = nn.Parameter(net.embed.weight.data)
    net.proj.weight = nn.Parameter(net.embed.weight.data[:16])  # the table's first rows
    reasons = {name: (g["use_muon"], why) for g in mk.param_groups(net)
               for name, why in g["param_reasons"].items()}
    assert reasons["head.weight"] == (False, "output head (tied to embed: shares its memory)")
    assert reasons["proj.weight"] == (False, "output head (tied to embed: shares its memory)")
    assert reasons["conv1.weight"][0] is True


def test_optimizer_steps_every_routed_parameter():
    net = Net()
    opt = mk.Muon(mk.param_groups(net, head=net.head), lr=0.02)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)
    rows = {r.shape: r for r in opt.plan()}
    assert rows[(4, 16, 24)].view == "batch 4×(16×24)" and rows[(4, 16, 24)].method == "Muon"
    assert rows[(16, 16, 5)].view == "flatten 16×80"
    assert rows[(50, 16)].method == "AdamW"


def test_plan_lists_every_parameter_of_a_param_groups_group_changed_by_hand():
    """A param_groups() group split or extended by hand kept its param_reasons: plan() paired them
    with the wrong parameters (a norm weight "embedding") and dropped the rows past their end."""
    net = Net()
    groups = mk.param_groups(net, head=net.head)
    adamw = next(g for g in groups if not g["use_muon"])
    extra = ("temperature", nn.Parameter(torch.zeros(3)))
    first, rest = adamw["params"][:1], adamw["params"][1:]
    groups = [g for g in groups if g is not adamw] + [{**adamw, "params": first, "lr": 1e-2},
                                                       {**adamw, "params": rest + [extra]}]
    reasons = adamw["param_reasons"]
    opt = mk.Muon(groups, lr=0.02)
    rows = {r.name: r for r in opt.plan()}
    assert set(rows) == {n for n, _ in net.named_parameters()} | {"temperature"}
    for name, why in reasons.items():
        assert rows[name].why == why, name
    assert rows["temperature"].why == "ndim 1 < 2"


def test_param_groups_of_a_parameter_iterator_says_to_pass_the_model():
    net = Net()
    with pytest.raises(TypeError, match=r"takes the model \(an nn.Module\), got generator: pass the model itself"):
        mk.param_groups(net.parameters())


def test_3d_without_matrix_view_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3D shape \(4, 16, 24\).*matrix_view='batch'.*matrix_view='flatten'"):
        mk.Muon([nn.Parameter(torch.randn(4, 16, 24))])
    with pytest.raises(ValueError, match="matrix_view must be one of"):
        mk.Muon([nn.Parameter(torch.randn(4, 16, 24))], matrix_view="stack")


def test_1d_in_a_muon_group_is_an_error():
    with pytest.raises(ValueError, match=r"'bias'.*use_muon=True.*use_muon=False"):
        mk.Muon([{"params": [("bias", nn.Parameter(torch.zeros(5)))], "use_muon": True}])


def test_group_without_use_muon_is_split_and_adamw_takes_adamw_settings():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    opt = mk.Muon(net.parameters(), lr=0.05, weight_decay=0.2, eps=1e-6, adamw_lr=1e-3, adamw_betas=(0.8, 0.9),
                  adamw_eps=1e-8, adamw_weight_decay=0.05)
    muon, adamw = opt.param_groups
    assert muon["use_muon"] and _ids(muon["params"]) == {id(net[0].weight)}
    assert (muon["lr"], muon["weight_decay"], muon["eps"]) == (0.05, 0.2, 1e-6)
    assert not adamw["use_muon"] and len(adamw["params"]) == 3
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-8, 0.05)
    # A use_muon=False group's own settings win over the adamw_* ones.
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "use_muon": False, "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5 and opt.param_groups[-1]["betas"] == (0.8, 0.9)


def test_a_group_dict_without_use_muon_keeps_its_muon_settings_out_of_the_adamw_half():
    """A group's own lr, eps and weight_decay are Muon's: its biases and norms step with adamw_*
    (checked against torch.optim.AdamW), never with the group's weight decay."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    theirs = [nn.Parameter(p.detach().clone()) for p in (net[0].bias, net[1].weight, net[1].bias)]
    opt = mk.Muon([{"params": list(net.parameters()), "lr": 0.05, "eps": 1e-6, "weight_decay": 0.3}],
                  adamw_lr=1e-2, adamw_eps=1e-8, adamw_weight_decay=0.0)
    muon, adamw = opt.param_groups
    assert (muon["lr"], muon["eps"], muon["weight_decay"]) == (0.05, 1e-6, 0.3)
    assert (adamw["lr"], adamw["eps"], adamw["weight_decay"]) == (1e-2, 1e-8, 0.0)
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        for p, q in zip(adamw["params"], theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        net[0].weight.grad = torch.randn_like(net[0].weight)
        opt.step()
        reference.step()
    for p, q in zip(adamw["params"], theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(3))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    ours = mk.Muon(ps, adamw_lr=1e-2, adamw_weight_decay=0.1)
    theirs = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(ours.state[p]) == set(theirs.state[q]) == {"step", "exp_avg", "exp_avg_sq"}


def test_named_parameters_and_plan_names():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = mk.Muon(net.named_parameters())
    text = str(opt.plan())
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in text
    assert opt.param_groups[0]["param_names"] == ["0.weight", "2.weight"]


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw", "spectral"])
def test_conv_scale_uses_the_flattened_view(adjust_lr_fn):
    """Conv2d(3→16, 3×3): the matrix is 16×27, so 'original' scales by sqrt(16/27) → 1, not sqrt(16/3)."""
    conv = nn.Conv2d(3, 16, 3)
    w0 = conv.weight.detach().clone()
    opt = mk.Muon([conv.weight], lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float32,
                  adjust_lr_fn=adjust_lr_fn)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    rows, cols = 16, 27
    scale = {None: math.sqrt(max(1, rows / cols)), "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
             "spectral": math.sqrt(rows / cols)}[adjust_lr_fn]
    expected = -0.1 * scale * reference_ns(conv.weight.grad.reshape(rows, cols))
    assert rel_err((conv.weight.detach() - w0).reshape(rows, cols), expected) <= 1e-4


def test_batch_view_orthogonalizes_each_expert():
    experts = nn.Parameter(torch.randn(3, 10, 6))
    w0 = experts.detach().clone()
    opt = mk.Muon([{"params": [experts], "matrix_view": "batch"}], lr=0.1, weight_decay=0.0, momentum=0.0,
                  ns_dtype=torch.float32)
    experts.grad = torch.randn_like(experts)
    opt.step()
    expected = -0.1 * math.sqrt(10 / 6) * reference_ns(experts.grad)
    assert rel_err(experts.detach() - w0, expected) <= 1e-4


def test_transposed_views_change_the_lr_scale_only():
    """A weight stored (in, out): the same orthogonalized update as its (out, in) twin, transposed,
    scaled from (out, in)."""
    torch.manual_seed(0)
    linear = nn.Parameter(torch.randn(24, 6))  # (out, in) = (24, 6)
    stored = nn.Parameter(linear.detach().mT.clone())  # the same layer stored (in, out)
    experts = nn.Parameter(torch.randn(3, 6, 24))  # (E, in, out)
    experts_out_in = nn.Parameter(experts.detach().mT.clone())
    kw = dict(lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float32)
    opt = mk.Muon([{"params": [linear]}, {"params": [stored], "matrix_view": "transposed"},
                   {"params": [experts], "matrix_view": "batch_transposed"},
                   {"params": [experts_out_in], "matrix_view": "batch"}], **kw)
    g, ge = torch.randn(24, 6), torch.randn(3, 24, 6)
    linear.grad, stored.grad = g, g.mT.clone()
    experts_out_in.grad, experts.grad = ge, ge.mT.clone()
    opt.step()
    torch.testing.assert_close(stored.detach().mT, linear.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(experts.detach().mT, experts_out_in.detach(), rtol=0, atol=1e-6)
    views = {r.shape: r.view for r in opt.plan()}
    assert views[(6, 24)] == "6×24 stored (in, out)" and views[(3, 6, 24)] == "batch 3×(6×24) stored (in, out)"
    with pytest.raises(ValueError, match="3D shape"):
        mk.Muon([{"params": [nn.Parameter(torch.randn(2, 3, 4))], "matrix_view": "transposed"}])


def test_learned_tokens_and_position_tables_go_to_adamw():
    """A module's own parameters named as learned tokens or position tables are embeddings, whatever
    their shape: ViT's (1, 1, d) cls_token and (1, N, d) position_embeddings looked like a stack of
    one matrix, Swin's (L, heads) bias table like a matrix."""
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 32))
            self.position_embeddings = nn.Parameter(torch.zeros(1, 17, 32))
            self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 2))
            self.proj = nn.Linear(32, 32)
            self.experts = nn.Parameter(torch.zeros(4, 32, 32))

    groups = mk.param_groups(Patches())
    routed = {name: (g["use_muon"], why) for g in groups
              for name, why in g["param_reasons"].items()}
    for name in ("cls_token", "position_embeddings", "relative_position_bias_table"):
        assert routed[name] == (False, f"learned token / position table ({name})")
    assert routed["proj.weight"][0] and routed["experts"][0]


def _routes(model):
    """name → (use_muon, matrix_view, reason) for every parameter param_groups routes."""
    return {name: (g["use_muon"], g.get("matrix_view"), why) for g in mk.param_groups(model)
            for name, why in g["param_reasons"].items()}


def test_vectors_stored_as_matrices_go_to_adamw():
    """A matrix with one row or one column (per matrix of a stack) has the polar factor g/‖g‖:
    nn.MultiheadAttention's bias_k/bias_v (1, 1, E) went to Muon as a stack of one 1×E matrix."""
    model = nn.Sequential(nn.Linear(16, 32), nn.MultiheadAttention(16, 2, add_bias_kv=True), nn.Linear(32, 1),
                          nn.Linear(1, 8), Experts(n=3, d=1, f=24))
    routes = _routes(model)
    assert routes["1.bias_k"] == routes["1.bias_v"] == (False, None, "bias")
    for name, shape in (("2.weight", "1×32"), ("3.weight", "8×1"), ("4.w_in", "3×1×24")):
        use_muon, _, why = routes[name]
        assert not use_muon and why.startswith(f"a vector stored as {shape}"), (name, why)
    assert routes["0.weight"][0] and routes["1.in_proj_weight"][0] and routes["1.out_proj.weight"][0]


def test_parametrized_weights_are_routed_as_their_layers_weight():
    """torch.nn.utils.parametrize keeps a weight's tensors on a ParametrizationList
    ("<layer>.parametrizations.weight.original0/1"): routed by that list, weight norm's conv
    direction (out, in, k) went to Muon as `out` separate in×k "experts", its magnitude as
    matrices, and a weight-normed depthwise conv to Muon."""
    from torch.nn.utils import parametrizations
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(16, 32)),
                          parametrizations.weight_norm(nn.Conv1d(16, 32, 5)),
                          parametrizations.weight_norm(nn.Conv2d(8, 8, 3, groups=8)),
                          parametrizations.spectral_norm(nn.Linear(8, 8)))
    routes = _routes(model)
    assert routes["0.parametrizations.weight.original1"] == (True, None, "matrix (out, in)")
    assert routes["1.parametrizations.weight.original1"] == (True, "flatten", "conv filter")
    assert routes["3.parametrizations.weight.original"] == (True, None, "matrix (out, in)")
    for name in ("0.parametrizations.weight.original0", "1.parametrizations.weight.original0"):
        assert not routes[name][0] and routes[name][2].startswith("a vector stored as"), name
    for name in ("2.parametrizations.weight.original0", "2.parametrizations.weight.original1"):
        assert not routes[name][0] and routes[name][2].startswith("depthwise conv"), name
    top = _routes(parametrizations.weight_norm(nn.Linear(4, 6)))  # the model itself parametrized
    assert top["parametrizations.weight.original1"] == (True, None, "matrix (out, in)")
    assert not top["parametrizations.weight.original0"][0]


def test_transposed_conv_filters_are_flattened_as_stored_and_say_so():
    routes = _routes(nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2)))
    assert routes["0.weight"] == (True, "flatten", "transposed-conv filter (in, out, k…)")


def _group_of(groups, name):
    return next(g for g in groups for n, _ in g["params"] if n == name)


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 5)
        self.stack = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))


def test_heads_given_as_a_list_or_a_container_all_go_to_adamw():
    groups = mk.param_groups(_Heads(), head=["a", "b", "stack"])
    for name in ("a.weight", "b.weight", "stack.0.weight", "stack.2.weight"):
        assert not _group_of(groups, name)["use_muon"], name
    assert _group_of(groups, "body.weight")["use_muon"]
    with pytest.raises(ValueError, match="neither a module"):
        mk.param_groups(_Heads(), head=42)


class _Odd(nn.Module):
    is_transposed = True  # a layer storing (E, in, out): (4, 16, 1) experts are vectors

    def __init__(self):
        super().__init__()
        self.pos_enc, self.posEmbed = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(16, 32))
        self.rel_bias_table = nn.Parameter(torch.randn(49, 4))
        self.experts = nn.Parameter(torch.randn(4, 16, 1))
        self.kernel = nn.Parameter(torch.randn(4, 8, 3, 3))
        self.one_channel, self.grouped = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3, groups=2)


def test_routing_of_tables_experts_free_4d_kernels_and_ordinary_convs():
    groups = mk.param_groups(_Odd())
    for name in ("pos_enc", "posEmbed", "rel_bias_table", "experts"):
        assert not _group_of(groups, name)["use_muon"], name
    for name in ("kernel", "one_channel.weight", "grouped.weight"):  # not depthwise: filters, flattened
        group = _group_of(groups, name)
        assert group["use_muon"] and group["matrix_view"] == "flatten", name


class _HeadFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.emb = nn.Linear(8, 10, bias=False), nn.Embedding(10, 8)
        self.head.weight = self.emb.weight


def test_ties_on_the_meta_device_and_in_one_buffer():
    """Meta tensors have no memory (data_ptr 0): only ties by object count there; views laid back to
    back in one buffer are not tied; frozen parameters are in no group."""
    with torch.device("meta"):
        deferred = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
        tied = _HeadFirst()
    assert _group_of(mk.param_groups(deferred), "1.weight")["use_muon"]
    assert not _group_of(mk.param_groups(tied), "head.weight")["use_muon"]
    buffer = torch.randn(10 * 8 + 8 * 8)
    adjacent = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8, bias=False))
    adjacent[0].weight = nn.Parameter(buffer[:80].view(10, 8))
    adjacent[1].weight = nn.Parameter(buffer[80:].view(8, 8))
    assert _group_of(mk.param_groups(adjacent), "1.weight")["use_muon"]
    frozen = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    frozen[0].requires_grad_(False)
    names = [n for g in mk.param_groups(frozen) for n, _ in g["params"]]
    assert "0.weight" not in names and "0.bias" not in names and "1.weight" in names
