"""Real Hugging Face transformers models (tiny configs, random init, no downloads): every parameter
routed once, with its name and reason, and every Muon matrix scaled from its true (out, in) shape —
checked against an expectation written here from each module's own layout metadata."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # the test extra installs it
from transformers.pytorch_utils import Conv1D  # noqa: E402

import muon_kernels as mk  # noqa: E402

torch.set_num_threads(1)


def _configs():
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, tie_word_embeddings=False)),
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **small, num_local_experts=4, num_experts_per_tok=2)),
        "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **small, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2)),
        "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)),
        "resnet": lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
        "convnext": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
    }


def _expected(model: nn.Module, head: nn.Module | None):
    """name → ("AdamW", None) or ("Muon", (out, in) per matrix), from module types and metadata."""
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    # GPT-2's fused q|k|v (attention.c_attn, split_size = embed_dim wide blocks) is split into its
    # d×d blocks, each scaled from its own shape.
    fused = {id(m.c_attn): m.embed_dim for m in model.modules() if hasattr(m, "c_attn") and hasattr(m, "split_size")}
    out = {}
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            if (isinstance(module, nn.Embedding) or id(p) in head_ids or "bias" in pname or p.ndim < 2
                    or depthwise):
                out[name] = ("AdamW", None)
            elif id(module) in fused:
                out[name] = ("Muon", (fused[id(module)], fused[id(module)]))
            elif isinstance(module, Conv1D):  # weight (nx, nf): in = nx, out = nf
                out[name] = ("Muon", (module.nf, module.nx))
            elif isinstance(module, nn.Linear) and 1 in (module.out_features, module.in_features):
                out[name] = ("AdamW", None)  # a vector (Qwen2-MoE's shared_expert_gate: hidden → 1)
            elif isinstance(module, nn.Linear):
                out[name] = ("Muon", (module.out_features, module.in_features))
            elif isinstance(module, nn.Conv2d):
                out[name] = ("Muon", (module.out_channels, p[0].numel()))
            elif p.ndim == 3:  # fused experts: (E, in, out) where the module says is_transposed
                out[name] = ("Muon", (p.shape[2], p.shape[1]) if module.is_transposed else (p.shape[1], p.shape[2]))
            else:
                out[name] = ("Muon", tuple(p.shape))
    return out


def _scales(opt):
    work = [(gi, g, g["params"]) for gi, g in enumerate(opt.param_groups) if g["use_muon"]]
    return {id(e.param): e.scale for b in opt._plan_buckets(work)[0] for e in b.entries}


@pytest.mark.parametrize("arch", list(_configs()))
def test_routing_and_lr_scale_follow_the_models_own_layout(arch):
    torch.manual_seed(0)
    model = _configs()[arch]()
    head = model.get_output_embeddings() if arch not in ("resnet", "convnext") else model.classifier
    kwargs = {} if arch not in ("resnet", "convnext") else {"head": "classifier"}
    opt = mk.Muon(mk.param_groups(model, **kwargs), lr=0.02)
    expected = _expected(model, head)
    rows = opt.plan()
    names = [r.name for r in rows]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once, named
    params = dict(model.named_parameters())
    scales = _scales(opt)
    for row in rows:
        method, shape = expected[row.name]
        assert row.method == method, (row.name, row.why)
        assert row.why and not row.why.startswith("group has")
        if method == "Muon":
            out_, in_ = shape
            assert scales[id(params[row.name])] == pytest.approx(math.sqrt(max(1, out_ / in_))), row.name


def test_gpt2_conv1d_and_gpt_oss_experts_are_scaled_from_out_in():
    gpt2 = _configs()["gpt2"]()
    opt = mk.Muon(mk.param_groups(gpt2))
    why = {r.name: (r.view, r.why) for r in opt.plan()}
    c_fc = gpt2.transformer.h[0].mlp.c_fc  # Conv1D(nf=128, nx=32): stored (32, 128), a 128×32 Linear
    assert tuple(c_fc.weight.shape) == (32, 128)
    assert _scales(opt)[id(c_fc.weight)] == pytest.approx(2.0)  # sqrt(128 / 32), not 1 from the stored shape
    assert "stored (in, out)" in why["transformer.h.0.mlp.c_fc.weight"][0]
    assert "Conv1D stored (in, out)" in why["transformer.h.0.mlp.c_fc.weight"][1]
    assert why["transformer.wte.weight"][1].startswith("embedding")
    oss = _configs()["gpt_oss"]()
    opt = mk.Muon(mk.param_groups(oss))
    experts = oss.model.layers[0].mlp.experts
    assert experts.is_transposed
    E, hidden, two_i = experts.gate_up_proj.shape
    assert _scales(opt)[id(experts.gate_up_proj)] == pytest.approx(math.sqrt(two_i / hidden))
    plan = {r.name: r for r in opt.plan()}
    assert plan["model.layers.0.mlp.experts.gate_up_proj"].why.startswith("experts (E, in, out)")
    for bias in ("gate_up_proj_bias", "down_proj_bias"):  # 2D per-expert biases are never orthogonalized
        row = plan[f"model.layers.0.mlp.experts.{bias}"]
        assert row.method == "AdamW" and row.why == "bias" and len(row.shape) == 2


def test_a_container_head_covers_its_parameters_and_an_untied_head_is_found():
    resnet = _configs()["resnet"]()
    rows = {r.name: r for r in mk.Muon(mk.param_groups(resnet, head="classifier")).plan()}
    assert rows["classifier.1.weight"].method == "AdamW" and rows["classifier.1.weight"].why == "output head"
    llama = _configs()["llama"]()
    plan = mk.Muon(mk.param_groups(llama)).plan()
    rows = {r.name: r for r in plan}
    assert rows["lm_head.weight"].method == "AdamW" and rows["lm_head.weight"].why == "output head"
    assert not plan.notes
    no_head = mk.Muon(mk.param_groups(resnet)).plan()  # ResNet has no get_output_embeddings: say so
    assert any("no output head identified" in n for n in no_head.notes)
    assert "note: no output head identified" in str(no_head)


def test_depthwise_convolutions_go_to_adamw():
    convnext = _configs()["convnext"]()
    rows = {r.name: r for r in mk.Muon(mk.param_groups(convnext, head="classifier")).plan()}
    dw = [n for n in rows if n.endswith("dwconv.weight")]
    assert dw and all(rows[n].method == "AdamW" and rows[n].why.startswith("depthwise conv") for n in dw)
    assert rows["convnext.embeddings.patch_embeddings.weight"].method == "Muon"


def test_hugging_face_trainer_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    """Trainer(optimizers=(Muon(param_groups(model)), CosineLR(...))): a run resumed from its step-3
    checkpoint ends with the same bits as the uninterrupted run."""
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 16), generator=g)]

    def run(out, resume=None, max_steps=6):
        torch.manual_seed(0)
        model = _configs()["gpt2"]()
        opt = mk.Muon(mk.param_groups(model), lr=0.02, adamw_lr=1e-3, ns_dtype=torch.float32)
        sched = mk.CosineLR(opt, total_steps=6, warmup_steps=1)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps",
            save_steps=3, logging_steps=100, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    torch.manual_seed(0)
    start = _configs()["gpt2"]()
    moved = [n for (n, p), (_, s) in zip(full.named_parameters(), start.named_parameters()) if not torch.equal(p, s)]
    assert len(moved) == len(list(start.parameters()))  # every parameter trained
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
