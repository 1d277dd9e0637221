"""Turns the raw curves of bench/convergence.py into docs/convergence.md, its verdicts and figures.

Every verdict is computed here from the numbers, by rules fixed before looking at results and
stated in the document; nothing is written by hand. matplotlib is optional: without it the
document says that the figures were not drawn.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

# "Converged" for the Nesterov claim: the final full-batch loss is at most half the initial loss and
# the running minimum of the gradient norm ends at most half the largest gradient norm seen.
CONVERGED_LOSS_RATIO = 0.5
CONVERGED_GRAD_RATIO = 0.5


def _min_grad(curve) -> float:
    """Minimum over the evaluation points after the start: at initialization a small network sits
    near a flat point whose tiny gradient says nothing about the optimizer."""
    return min(p["grad_norm"] for p in curve[1:])


def _floor(curve) -> float:
    """Mean gradient norm over the second half of the run: where a constant-lr run plateaus."""
    half = curve[len(curve) // 2:]
    return statistics.fmean(p["grad_norm"] for p in half)


def _stats(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, digits=3) -> str:
    values = list(values)
    mean, std = _stats(values)
    return f"{mean:.{digits}g} ± {std:.2g}" if len(values) > 1 else f"{mean:.{digits}g}"


def _group(runs, *keys):
    out = defaultdict(list)
    for r in runs:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _converged(curve) -> bool:
    return (curve[-1]["loss"] <= CONVERGED_LOSS_RATIO * curve[0]["loss"]
            and _min_grad(curve) <= CONVERGED_GRAD_RATIO * max(p["grad_norm"] for p in curve))


def _verdict(hits: int, total: int) -> str:
    return "holds" if hits == total else ("does not hold" if hits == 0 else "mixed")


def task_claims(task: dict) -> tuple[list[dict], dict]:
    """The per-task claims of DESIGN.md §6 with verdict and evidence, and the table rows."""
    sweep = [r for r in task["runs"] if r["experiment"] == "sweep"]
    samples = [r for r in sweep if r["view"] == "equal-samples"]
    steps_view = [r for r in sweep if r["view"] == "equal-steps" or r["batch_schedule"] == "constant"]
    claims = []

    # 1. Larger constant batch, lower floor (equal steps, constant lr).
    floor = {s: runs for (s,), runs in _group([r for r in task["runs"] if r["experiment"] == "batch-floor"],
                                              "batch_size").items()}
    sizes = sorted(floor)
    floors = [statistics.fmean(_floor(r["curve"]) for r in floor[s]) for s in sizes]
    mins = [statistics.fmean(_min_grad(r["curve"]) for r in floor[s]) for s in sizes]
    pairs = len(sizes) - 1
    down = sum(floors[i + 1] < floors[i] for i in range(pairs)) + sum(mins[i + 1] < mins[i] for i in range(pairs))
    claims.append({
        "claim": "A larger constant batch lowers the floor of min‖∇f‖ (equal steps, constant lr)",
        "verdict": _verdict(down, 2 * pairs),
        "evidence": "batch " + ", ".join(f"{s}: floor {f:.3g}, min {m:.3g}" for s, f, m in zip(sizes, floors, mins)),
    })

    # 2. Growing batch removes the variance term: growing beats constant with the same lr schedule.
    def wins(runs):
        by = _group(runs, "lr_schedule", "nesterov", "batch_schedule")
        hits = total = 0
        for lr in task_lr_kinds(task):
            for nest in (True, False):
                grow, const = by.get((lr, nest, "growing")), by.get((lr, nest, "constant"))
                if grow and const:
                    total += 1
                    hits += statistics.fmean(_min_grad(r["curve"]) for r in grow) < statistics.fmean(
                        _min_grad(r["curve"]) for r in const)
        return hits, total

    hs, ts = wins(steps_view)
    hb, tb = wins(samples)
    claims.append({
        "claim": "An exponentially growing batch removes the variance term (growing beats constant, same lr schedule)",
        "verdict": _verdict(hs, ts) if _verdict(hs, ts) == _verdict(hb, tb) else "mixed",
        "evidence": f"lower min‖∇f‖ with the growing batch in {hs}/{ts} (lr schedule, Nesterov) pairs at equal steps "
                    f"and {hb}/{tb} at an equal budget of samples",
    })

    # 3. Diminishing lr + growing batch is the best combination (equal samples, mean over seeds and Nesterov).
    combos = _group(samples, "lr_schedule", "batch_schedule")
    ranked = sorted(combos, key=lambda k: statistics.fmean(_min_grad(r["curve"]) for r in combos[k]))
    place = ranked.index(("diminishing", "growing")) + 1 if ("diminishing", "growing") in combos else None
    combos_steps = _group(steps_view, "lr_schedule", "batch_schedule")
    ranked_steps = sorted(combos_steps, key=lambda k: statistics.fmean(_min_grad(r["curve"]) for r in combos_steps[k]))
    place_steps = (ranked_steps.index(("diminishing", "growing")) + 1
                   if ("diminishing", "growing") in combos_steps else None)
    claims.append({
        "claim": "Diminishing lr with a growing batch is the best combination",
        "verdict": "holds" if place == 1 and place_steps == 1 else ("mixed" if 1 in (place, place_steps) else "does not hold"),
        "evidence": f"rank {place} of {len(ranked)} (lr × batch) at an equal budget of samples, best there: "
                    f"{ranked[0][0]} lr + {ranked[0][1]} batch; rank {place_steps} of {len(ranked_steps)} at equal steps",
    })

    # 4. Muon converges with and without Nesterov.
    by_nest = {n: runs for (n,), runs in _group(samples, "nesterov").items()}
    ok = {n: sum(_converged(r["curve"]) for r in by_nest[n]) for n in by_nest}
    tot = {n: len(by_nest[n]) for n in by_nest}
    loss = {n: _stats(r["curve"][-1]["loss"] for r in by_nest[n])[0] for n in by_nest}
    claims.append({
        "claim": "Muon converges with and without Nesterov",
        "verdict": _verdict(sum(ok.values()), sum(tot.values())),
        "evidence": f"converged runs: Nesterov {ok.get(True, 0)}/{tot.get(True, 0)}, plain {ok.get(False, 0)}/"
                    f"{tot.get(False, 0)}; mean final loss {loss.get(True, math.nan):.3g} vs {loss.get(False, math.nan):.3g}",
    })

    rows = []
    for (lr, batch, nest), runs in sorted(_group(samples, "lr_schedule", "batch_schedule", "nesterov").items(),
                                          key=lambda kv: (task_lr_kinds(task).index(kv[0][0]), kv[0][1], not kv[0][2])):
        eq_steps = [r for r in steps_view if (r["lr_schedule"], r["batch_schedule"], r["nesterov"]) == (lr, batch, nest)]
        row = {"lr": lr, "batch": batch, "nesterov": nest, "steps": runs[0]["steps"],
               "samples": runs[0]["curve"][-1]["samples"],
               "final_grad": _fmt(r["curve"][-1]["grad_norm"] for r in runs),
               "min_grad": _fmt(_min_grad(r["curve"]) for r in runs),
               "loss": _fmt(r["curve"][-1]["loss"] for r in runs),
               "min_grad_equal_steps": _fmt(_min_grad(r["curve"]) for r in eq_steps)}
        if "test_accuracy" in runs[0]["curve"][-1]:
            row["test"] = _fmt(100 * r["curve"][-1]["test_accuracy"] for r in runs)
        else:
            row["test"] = _fmt(r["curve"][-1]["test_loss"] for r in runs)
        rows.append(row)
    return claims, rows


def task_lr_kinds(task) -> list[str]:
    return list(dict.fromkeys(r["lr_schedule"] for r in task["runs"] if r["experiment"] == "sweep"))


def quadratic_claim(quad: dict) -> tuple[dict, list[dict]]:
    by = _group(quad["rows"], "rank", "method")
    ranks = sorted({r for r, _ in by})
    table = []
    for rank in ranks:
        row = {"rank": rank}
        for method in ("muon", "gd", "sgd-momentum"):
            row[method] = statistics.fmean(math.log10(max(r["best_ratio"], 1e-300)) for r in by[(rank, method)])
        table.append(row)
    gain = [r["gd"] - r["muon"] for r in table]  # log10 advantage of Muon over gradient descent
    wins = [g > 0 for g in gain]
    shrinks = all(gain[i + 1] <= gain[i] for i in range(len(gain) - 1))
    verdict = "holds" if wins[0] and shrinks else ("mixed" if any(wins) else "does not hold")
    momentum = [r["sgd-momentum"] - r["muon"] for r in table]
    return {
        "claim": "Muon gains over gradient descent when the Hessian is low-rank (and less so as the rank grows)",
        "verdict": verdict,
        "evidence": "log10 of GD's best f(W_T)/f(W_0) over Muon's, by rank: "
                    + ", ".join(f"{r['rank']}: {g:+.2f}" for r, g in zip(table, gain))
                    + "; against SGD with momentum: " + ", ".join(f"{r['rank']}: {g:+.2f}" for r, g in zip(table, momentum))
                    + " (positive: Muon lower)",
    }, table


def _plots(result: dict, docs: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    for task in result["tasks"]:
        sweep = [r for r in task["runs"] if r["experiment"] == "sweep"]
        lrs = task_lr_kinds(task)
        for view, x_key, label in (("equal-samples", "samples", "samples processed (gradient evaluations)"),
                                   ("equal-steps", "step", "optimizer steps")):
            fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.4), sharey=True, squeeze=False)
            for ax, lr in zip(axes[0], lrs):
                for (batch, nest), runs in sorted(_group([r for r in sweep if r["lr_schedule"] == lr], "batch_schedule",
                                                         "nesterov").items()):
                    runs = [r for r in runs if r["view"] == view or (batch == "constant")]
                    if not runs:
                        continue
                    # From the first evaluation after the start, like the tables' "min" (see _min_grad).
                    xs = [p[x_key] for p in runs[0]["curve"][1:]]
                    ys = [statistics.fmean(r["curve"][i + 1]["grad_norm"] for r in runs) for i in range(len(xs))]
                    running = [min(ys[: i + 1]) for i in range(len(ys))]
                    ax.plot(xs, running, label=f"{batch} batch, {'Nesterov' if nest else 'plain'}",
                            linestyle="-" if nest else "--")
                ax.set_title(f"{lr} lr")
                ax.set_xlabel(label)
                ax.set_yscale("log")
            axes[0][0].set_ylabel("running min ‖∇f(W_t)‖ (full batch, t > 0)")
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{task['task']}: {view}")
            fig.tight_layout()
            name = f"convergence-{task['key']}-{view}.png"
            fig.savefig(docs / name, dpi=110)
            plt.close(fig)
            names.append(name)
    quad = result["quadratic"]
    _, table = quadratic_claim(quad)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method in ("muon", "gd", "sgd-momentum"):
        ax.plot([r["rank"] for r in table], [10 ** r[method] for r in table], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank of the Hessian's large part")
    ax.set_ylabel(f"best f(W_T)/f(W_0), T={quad['steps']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "convergence-quadratic.png", dpi=110)
    plt.close(fig)
    names.append("convergence-quadratic.png")
    return names


def write_report(result: dict, docs: Path, *, json_name: str) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    figures = _plots(result, docs)
    lines = [
        "# Convergence experiments",
        "",
        f"Generated by `bench/convergence.py` ({result['mode']} mode"
        + (f", every run capped at {result['smoke_steps']} steps" if result.get("smoke_steps") else "")
        + f") on {result['device']}, commit `{result['commit']}`, {result['date']}, in {result['seconds'] / 60:.1f} min; "
        f"raw curves in `bench/results/{json_name}`. Regenerate with `make reproduce` (full, into docs/; "
        "`REPRODUCE_ARGS=--quick`: a shorter run whose report goes into a folder beside its JSON).",
        "",
        "Setup: Muon with the torch backend in fp32, weight decay 0, momentum 0.95, one peak lr per task for every "
        "configuration (not tuned per schedule: the diminishing schedule η/√(t+1) with the same η spends most of "
        "its steps at a far smaller lr than the others); the lr schedules run over each run's own number of steps (polynomial power "
        f"{result['polynomial_power']}); the growing batch starts at a quarter of the constant batch and grows by "
        f"{result['growth']}× every 1/32 of the constant run's steps, up to a cap. ‖∇f‖ is the gradient of the loss over "
        "the whole fixed training set, of the Muon-stepped matrices (digits: every parameter), measured at evenly "
        "spaced points; \"min\" is its minimum over those points after the start (at initialization the small "
        "networks sit near a flat point with a tiny gradient).",
        "",
        f"Rules fixed in advance: a claim *holds* when every comparison it makes goes its way, *does not hold* when none "
        f"does, and is *mixed* otherwise. A run *converged* when its final loss is ≤ {CONVERGED_LOSS_RATIO}× its initial "
        f"loss and its minimum ‖∇f‖ is ≤ {CONVERGED_GRAD_RATIO}× the largest ‖∇f‖ it saw. The batch floor is the mean ‖∇f‖ "
        "over the second half of a constant-lr run.",
        "",
        "## Claims and outcomes",
        "",
        "| task | claim | outcome | numbers |",
        "|---|---|---|---|",
    ]
    per_task = []
    for task in result["tasks"]:
        claims, rows = task_claims(task)
        per_task.append((task, rows))
        for c in claims:
            lines.append(f"| {task['task']} | {c['claim']} | **{c['verdict']}** | {c['evidence']} |")
    qclaim, qtable = quadratic_claim(result["quadratic"])
    lines.append(f"| low-rank quadratic | {qclaim['claim']} | **{qclaim['verdict']}** | {qclaim['evidence']} |")
    for task, rows in per_task:
        test_label = "test accuracy %" if task["key"] == "digits" else "test loss"
        lines += [
            "", f"## {task['task']}", "",
            f"{task['num_samples']} training samples; budget {task['budget_samples']} samples per run; constant batch "
            f"{task['base_batch']}; Muon lr {task['muon_lr']}" + (f", AdamW lr {task['adamw_lr']}" if task["adamw_lr"] else "")
            + f"; {len({r['seed'] for r in task['runs']})} seed(s), mean ± std.", "",
            f"| lr | batch | Nesterov | steps | samples | final ‖∇f‖ | min ‖∇f‖ | final loss | {test_label} | min ‖∇f‖ at equal steps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['lr']} | {r['batch']} | {'yes' if r['nesterov'] else 'no'} | {r['steps']} | {r['samples']} | "
                         f"{r['final_grad']} | {r['min_grad']} | {r['loss']} | {r['test']} | {r['min_grad_equal_steps']} |")
        for name in figures:
            if name.startswith(f"convergence-{task['key']}-"):
                lines += ["", f"![{name}]({name})"]
    q = result["quadratic"]
    lines += [
        "", "## Low-rank quadratic", "",
        f"f(W) = ½⟨W−W*, H(W−W*)⟩, W ∈ R^{q['m']}×{q['n']}, H = UUᵀ + {q['floor']}·I with U having `rank` orthonormal "
        f"columns; {q['steps']} steps with a cosine lr schedule, each method at its best peak lr from "
        f"{len(q['lrs'])} log-spaced values in [{q['lrs'][0]:.3g}, {q['lrs'][-1]:.3g}]; log10 of f(W_T)/f(W_0), "
        "mean over seeds (lower is better).", "",
        "| rank | Muon | GD | SGD + momentum 0.9 |", "|---|---|---|---|",
    ]
    lines += [f"| {r['rank']} | {r['muon']:.2f} | {r['gd']:.2f} | {r['sgd-momentum']:.2f} |" for r in qtable]
    if "convergence-quadratic.png" in figures:
        lines += ["", "![convergence-quadratic.png](convergence-quadratic.png)"]
    if not figures:
        lines += ["", "(matplotlib is not installed, so no figures were drawn: `pip install .[experiments]`.)"]
    lines += ["", "Not done: the optional GPT-2-small-shaped sweep on a GPU (the one GPU session so far, an H200 on "
              "2026-12-04, ran the tests and the benchmark only).", ""]
    path = docs / "convergence.md"
    path.write_text("\n".join(lines))
    return path
