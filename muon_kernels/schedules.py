"""Learning-rate and batch-size schedules studied by the Muon convergence analyses (DESIGN.md §6).

Learning rate over ``total_steps`` T, each optionally after a linear warm-up of W steps (the decay
then runs over the remaining T - W steps, with t counted from the end of the warm-up):

    constant     η
    cosine       η_min + (η - η_min)(1 + cos(πt/T)) / 2
    polynomial   (η - η_min)(1 - t/T)^p + η_min
    diminishing  η / √(t + 1)

η is each param group's own initial lr (Muon and AdamW groups alike) and η_min is
``min_lr_ratio · η``, so one scheduler serves groups whose lrs differ by orders of magnitude.
The schedulers are ``torch.optim.lr_scheduler.LRScheduler`` subclasses with closed forms: the lr at
step t never depends on the lr at step t-1, so a restored ``state_dict`` continues exactly (into a
fresh optimizer too). Like torch's ``LambdaLR`` they do not chain: a change another scheduler
(``ChainedScheduler``, ``ReduceLROnPlateau``) makes to a group's lr lasts until the next step;
``SequentialLR`` composes them in time.

Batch size at step t: constant b, or ``b_t = min(cap, round(b0 · δ^⌊t/E⌋))``.
``ScheduledBatchSampler`` turns a batch-size schedule into index lists for
``DataLoader(batch_sampler=...)``; ``split_batch`` is the gradient-accumulation equivalent for
when the cap is set by device memory rather than by the schedule.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from .real_number import is_real


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_common(total_steps, warmup_steps, min_lr_ratio, need_total: bool) -> None:
    if total_steps is None:
        if need_total:
            raise ValueError("total_steps must be a positive integer (the schedule's length T), got None")
    else:
        _positive_int("total_steps", total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if total_steps is not None and warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps}): "
            "the decay runs over the steps after the warm-up"
        )
    if not (is_real(min_lr_ratio) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be in [0, 1] (η_min as a fraction of each group's lr), got {min_lr_ratio!r}")


class _ClosedFormLR(LRScheduler):
    """Base: the lr of every group is ``initial_lr · factor(step)``; subclasses give ``_decay``."""

    _needs_total = True

    def __init__(self, optimizer, total_steps=None, *, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 last_epoch: int = -1):
        _check_common(total_steps, warmup_steps, min_lr_ratio, self._needs_total)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def _decay(self, t: int, horizon: int | None) -> float:
        """Fraction of the way from η_min to η at decay step t of ``horizon`` steps."""
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """The multiplier on each group's initial lr at ``step`` (0-based)."""
        if step < self.warmup_steps:
            # Linear warm-up reaching the full lr at the last warm-up step, never exactly 0.
            return (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        horizon = None if self.total_steps is None else self.total_steps - self.warmup_steps
        if horizon is not None:
            t = min(t, horizon)  # past T the schedule holds its final value
        r = self.min_lr_ratio
        return r + (1.0 - r) * self._decay(t, horizon)

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr


class ConstantLR(_ClosedFormLR):
    """η at every step (after the optional warm-up). ``total_steps`` is optional."""

    _needs_total = False

    def _decay(self, t, horizon):
        return 1.0


class CosineLR(_ClosedFormLR):
    """η_min + (η - η_min)(1 + cos(πt/T)) / 2."""

    def _decay(self, t, horizon):
        return 0.5 * (1.0 + math.cos(math.pi * t / horizon))


class PolynomialLR(_ClosedFormLR):
    """(η - η_min)(1 - t/T)^p + η_min; p = 1 is linear decay."""

    def __init__(self, optimizer, total_steps, *, power: float = 1.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if not is_real(power) or not power > 0:
            raise ValueError(f"power must be a number > 0, got {power!r}")
        self.power = float(power)
        super().__init__(optimizer, total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                         last_epoch=last_epoch)

    def _decay(self, t, horizon):
        return (1.0 - t / horizon) ** self.power


class DiminishingLR(_ClosedFormLR):
    """η_min + (η - η_min) / √(t + 1): η / √(t + 1) with the default min_lr_ratio = 0, like the other
    schedules a blend toward η_min = min_lr_ratio·η otherwise (not max(η / √(t + 1), η_min)).
    ``total_steps`` is optional."""

    _needs_total = False

    def _decay(self, t, horizon):
        return 1.0 / math.sqrt(t + 1)


LR_SCHEDULES = {"constant": ConstantLR, "cosine": CosineLR, "polynomial": PolynomialLR,
                "diminishing": DiminishingLR}


# --------------------------------------------------------------------------------------------
# Batch-size schedules


class ConstantBatchSize:
    """b at every step."""

    def __init__(self, batch_size: int):
        self.batch_size = _positive_int("batch_size", batch_size)

    def __call__(self, step: int) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"ConstantBatchSize({self.batch_size})"


class ExponentialBatchSize:
    """``b_t = min(max_batch_size, round(b0 · growth^⌊t/every⌋))``: grows by ``growth`` every ``every`` steps."""

    def __init__(self, initial_batch_size: int, growth: float, every: int, max_batch_size: int | None = None):
        self.initial_batch_size = _positive_int("initial_batch_size", initial_batch_size)
        if not is_real(growth) or not growth > 1.0:
            raise ValueError(f"growth must be a number > 1 (δ; use ConstantBatchSize for δ = 1), got {growth!r}")
        self.growth = float(growth)
        self.every = _positive_int("every", every)
        if max_batch_size is not None:
            _positive_int("max_batch_size", max_batch_size)
            if max_batch_size < initial_batch_size:
                raise ValueError(
                    f"max_batch_size ({max_batch_size}) must be >= initial_batch_size ({initial_batch_size})"
                )
        self.max_batch_size = max_batch_size
        # The first growth count k at which b0·δ^k reaches the cap, found once: δ^k itself overflows a
        # float past ~1024/log2(δ) counts, which a capped schedule reaches in a long enough run.
        self._capped_from = None
        if max_batch_size is not None:
            k = max(0, math.floor(math.log(max_batch_size / initial_batch_size) / math.log(self.growth)) - 1)
            while initial_batch_size * self.growth ** k < max_batch_size:
                k += 1
            self._capped_from = k

    def __call__(self, step: int) -> int:
        k = step // self.every
        if self._capped_from is not None and k >= self._capped_from:
            return self.max_batch_size
        try:
            return round(self.initial_batch_size * self.growth ** k)
        except OverflowError:
            raise OverflowError(f"ExponentialBatchSize: the batch size at step {step} ({self.initial_batch_size}·"
                                f"{self.growth}^{k}) is beyond a float's range; give max_batch_size") from None

    def __repr__(self) -> str:
        return (f"ExponentialBatchSize({self.initial_batch_size}, growth={self.growth}, every={self.every}, "
                f"max_batch_size={self.max_batch_size})")


class ScheduledBatchSampler:
    """Index lists whose sizes follow a batch-size schedule, for ``DataLoader(batch_sampler=...)``.

    Indices come from a stream of permutations of ``range(num_samples)`` (epoch e shuffled with
    seed ``seed + e``; in order when ``shuffle=False``); a batch may straddle two epochs, so no
    sample is dropped and every epoch sees every sample once. Iteration yields batches from the
    current step until ``num_steps`` (forever when None). The stream is a pure function of
    (seed, step), so ``state_dict()``/``load_state_dict()`` — or ``set_step(k)`` with the training
    loop's own step count, which is what to use when a DataLoader with workers prefetches ahead —
    resume exactly.
    """

    def __init__(self, num_samples: int, schedule, *, num_steps: int | None = None, shuffle: bool = True,
                 seed: int = 0):
        self.num_samples = _positive_int("num_samples", num_samples)
        if not callable(schedule):
            raise ValueError(f"schedule must map a step to a batch size (e.g. ConstantBatchSize), got {schedule!r}")
        self.schedule = schedule
        if num_steps is not None:
            _positive_int("num_steps", num_steps)
        self.num_steps = num_steps
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.step = 0

    def batch_size(self, step: int) -> int:
        size = self.schedule(step)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"the batch-size schedule gave {size!r} at step {step}; it must give positive integers")
        return size

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps 0 .. step-1 (the gradient evaluations spent so far)."""
        return sum(self.batch_size(t) for t in range(step))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.samples_before(self.step)
        epoch, offset = divmod(position, self.num_samples)
        perm = self._permutation(epoch)
        while self.num_steps is None or self.step < self.num_steps:
            need = self.batch_size(self.step)
            parts = []
            while need > 0:
                take = min(need, self.num_samples - offset)
                parts.append(perm[offset:offset + take])
                offset += take
                need -= take
                if offset == self.num_samples:
                    epoch, offset = epoch + 1, 0
                    perm = self._permutation(epoch)
            self.step += 1
            yield torch.cat(parts).tolist()

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("a ScheduledBatchSampler without num_steps is endless and has no len()")
        return max(self.num_steps - self.step, 0)

    def set_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"state is for num_samples={state['num_samples']}, shuffle={state['shuffle']}; this sampler has "
                f"num_samples={self.num_samples}, shuffle={self.shuffle}: build it over the same dataset"
            )
        self.seed = int(state["seed"])
        self.set_step(int(state["step"]))


def split_batch(indices: Sequence[int], max_micro_batch_size: int) -> list[tuple[list[int], float]]:
    """Gradient accumulation: split one scheduled batch into micro-batches of at most
    ``max_micro_batch_size`` indices, each with the weight ``len(micro) / len(batch)``.

    Summing ``weight · mean-loss(micro)`` gradients over the micro-batches gives exactly the
    mean-loss gradient of the whole batch, so a schedule whose batch outgrows device memory keeps
    its meaning; call ``opt.step()`` once after the last micro-batch.
    """
    _positive_int("max_micro_batch_size", max_micro_batch_size)
    indices = list(indices)
    if not indices:
        raise ValueError("indices must not be empty")
    total = len(indices)
    return [(indices[i:i + max_micro_batch_size], min(max_micro_batch_size, total - i) / total)
            for i in range(0, total, max_micro_batch_size)]
