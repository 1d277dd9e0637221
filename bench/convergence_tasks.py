"""The problems of the convergence experiments (bench/convergence.py), all offline and CPU-sized.

- ``DigitsTask``: a bias-free MLP on scikit-learn's bundled handwritten digits (shipped inside the
  package, no download). Every parameter is a matrix stepped by Muon, so the full-batch gradient
  norm is exactly the quantity the convergence theorems bound.
- ``CharTransformerTask``: a small character-level (byte-level) transformer on this interpreter's
  own standard-library ``.py`` sources. Its matrices take Muon, embeddings/norms/head take AdamW;
  the gradient norm reported is that of the Muon matrices.
- ``quadratic``: ``f(W) = ½⟨W - W*, H(W - W*)⟩`` with H low-rank plus a small identity
  (Shen et al.'s setting where Muon should gain over gradient descent).

Each task is a finite sum over a fixed training set, so "full-batch gradient" is well defined.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import muon_kernels as mk


class DigitsTask:
    name = "digits-mlp"
    lr = 0.02          # Muon lr (all parameters); chosen once on a pilot run, the same for every config
    adamw_lr = 0.0     # nothing takes AdamW here
    base_batch = 32    # the constant batch size of the 16-configuration sweep
    max_batch = 10_000  # growing batches may reach the whole training set (full-batch gradient)

    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise RuntimeError("the digits task reads scikit-learn's bundled dataset: pip install '.[experiments]', "
                               "or run only the other task with --tasks chars") from e

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_test = len(y) // 5
        self.x_test, self.y_test = x[perm[:n_test]], y[perm[:n_test]]
        self.x, self.y = x[perm[n_test:]], y[perm[n_test:]]
        self.num_samples = len(self.y)

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 128, bias=False), nn.ReLU(),
                             nn.Linear(128, 10, bias=False))

    def param_groups(self, model):
        return [{"params": list(model.parameters()), "use_muon": True}]

    def tracked(self, model) -> list[torch.Tensor]:
        return list(model.parameters())

    def loss(self, model, idx) -> torch.Tensor:
        return F.cross_entropy(model(self.x[idx]), self.y[idx])

    def full_loss(self, model) -> torch.Tensor:
        return F.cross_entropy(model(self.x), self.y)

    @torch.no_grad()
    def test_metrics(self, model) -> dict:
        logits = model(self.x_test)
        return {"test_loss": F.cross_entropy(logits, self.y_test).item(),
                "test_accuracy": (logits.argmax(1) == self.y_test).float().mean().item()}


def stdlib_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of this interpreter's top-level stdlib ``.py`` files, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < max_bytes // 2:
        raise RuntimeError(f"found only {len(corpus)} bytes of .py sources under {root}")
    return corpus


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharModel(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class CharTransformerTask:
    name = "char-transformer"
    lr = 0.02
    adamw_lr = 3e-3
    base_batch = 16
    max_batch = 256    # growing batches stop here: CPU time, the role device memory plays on a GPU
    context, d, layers, heads = 32, 64, 2, 4

    def __init__(self, train_windows: int = 1024, test_windows: int = 256):
        corpus = torch.frombuffer(bytearray(stdlib_corpus(600_000)), dtype=torch.uint8).long()
        split = int(len(corpus) * 0.9)
        g = torch.Generator().manual_seed(0)
        span = self.context + 1

        def windows(lo, hi, count):
            starts = torch.randint(lo, hi - span, (count,), generator=g)
            return corpus[starts[:, None] + torch.arange(span)]

        self.train = windows(0, split, train_windows)      # a fixed finite training set
        self.test = windows(split, len(corpus), test_windows)
        self.num_samples = train_windows

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharModel(self.d, self.layers, self.heads, self.context)

    def param_groups(self, model):
        # Position table, embeddings, norms and head take AdamW; only the blocks' matrices take Muon.
        muon = {id(p) for p in self.tracked(model)}
        return [{"params": self.tracked(model), "use_muon": True},
                {"params": [p for p in model.parameters() if id(p) not in muon], "use_muon": False}]

    def tracked(self, model) -> list[torch.Tensor]:
        return [p for block in model.blocks for p in block.parameters() if p.ndim == 2]

    def _loss(self, model, seqs):
        logits = model(seqs[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), seqs[:, 1:].reshape(-1))

    def loss(self, model, idx):
        return self._loss(model, self.train[idx])

    def full_loss(self, model):
        return self._loss(model, self.train)

    @torch.no_grad()
    def test_metrics(self, model) -> dict:
        return {"test_loss": self._loss(model, self.test).item()}


TASKS = {"digits": DigitsTask, "chars": CharTransformerTask}


# --------------------------------------------------------------------------------------------
# Low-rank quadratic


def low_rank_quadratic(m: int, n: int, rank: int, floor: float, seed: int):
    """H = U diag(1) Uᵀ + floor·I (m×m, rank ``rank``) acting on the left; W*, W0 ~ N(0, 1/n)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    u = u[:, :rank]
    h = u @ u.T + floor * torch.eye(m, dtype=torch.float64)
    w_star = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return h, w_star, w0


def quadratic_value(h, w_star, w) -> float:
    d = w.double() - w_star
    return 0.5 * float((d * (h @ d)).sum())


def run_quadratic(method: str, lr: float, steps: int, h, w_star, w0) -> float:
    """f(W_T) / f(W_0) for one method at one peak lr with a cosine schedule over ``steps``."""
    w = nn.Parameter(w0.clone().float())
    if method == "muon":
        opt = mk.Muon([w], lr=lr, weight_decay=0.0, ns_dtype=torch.float32, backend="torch")
    elif method == "gd":
        opt = torch.optim.SGD([w], lr=lr)
    elif method == "sgd-momentum":
        opt = torch.optim.SGD([w], lr=lr, momentum=0.9)
    else:
        raise ValueError(method)
    sched = mk.CosineLR(opt, steps)
    h32, ws32 = h.float(), w_star.float()
    f0 = quadratic_value(h, w_star, w0)
    for _ in range(steps):
        with torch.no_grad():
            w.grad = h32 @ (w - ws32)
        opt.step()
        sched.step()
    value = quadratic_value(h, w_star, w.detach())
    return value / f0 if math.isfinite(value) else float("inf")
