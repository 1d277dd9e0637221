"""`make gpu-check OUT=<dir>`: everything a lent GPU must run, as one command under a time budget.

1. the GPU tests (``tests/gpu``, most important file first: ``GPU_TEST_FILES``) with every kernel
   work buffer NaN-filled (``MUON_KERNELS_DEBUG_FILL=nan``), reported to ``<dir>/pytest-gpu.xml``
   and ``pytest-gpu.txt``; beside them, from the start, in a second process, the CUDA extension's
   tests and compute-sanitizer's runs (``SIDE_TEST_FILES``: ``pytest-gpu-side.xml``/``.txt``); both
   test by test, as each ends, to ``pytest-gpu-progress.txt`` (what survives a run its budget stops);
2. ``bench/run.py --budget-minutes`` into ``<dir>`` (priority order, valid JSON when stopped early)
   and its plots;
3. ``<dir>/summary.md``: test counts, every target of ``bench/targets.json`` with its measured
   value (met, missed, or not measured), and what to commit.

The Makefile target builds ``_C`` for the device's own arch first (its log: ``<dir>/build.log``)
and passes the time it started, so the budget covers the build too. Nothing is downloaded. A
SIGTERM (``timeout``'s) stops the running phase's whole process group and still writes the
summary.

    python bench/gpu_check.py --out DIR [--minutes 8.5] [--tests-share 0.45] [--started EPOCH] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from common import git_commit

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TARGETS = BENCH / "targets.json"
TARGET_KINDS = ("step_speedup", "step_ratio", "ns_speedup", "ns_auto_floor", "update_fraction")


def load_targets(path: Path = TARGETS) -> list[dict]:
    """The target list, checked: every entry has a name, a known kind, its keys and a number to meet."""
    targets = json.loads(path.read_text())["targets"]
    needs = {"step_speedup": ("model",), "step_ratio": ("model", "impl", "base"),
             "ns_speedup": ("shape", "batch", "reference"), "ns_auto_floor": ("reference",),
             "update_fraction": ("model",)}
    for t in targets:
        if t.get("kind") not in TARGET_KINDS:
            raise ValueError(f"{path}: target {t.get('name')!r} has kind {t.get('kind')!r}, not one of {TARGET_KINDS}")
        missing = [k for k in ("name", "min", *needs[t["kind"]]) if k not in t]
        if missing or not isinstance(t["min"], (int, float)):
            raise ValueError(f"{path}: target {t.get('name')!r} lacks {missing or ['a numeric min']}")
    return targets


def measure(target: dict, result: dict) -> tuple[float | None, str]:
    """(value, what it is) of a target in a bench result; None where that run did not measure it."""
    if target["kind"] == "step_speedup":  # default math and launches: not the ns_algorithm="auto" (-gram),
        # variant or diagnostic (Triton's own dispatch) rows
        rows = [r for r in result.get("step_speedups", [])
                if r["model"] == target["model"] and r.get("width_divisor", 1) == 1
                and (r["impl"] == target["impl"] if "impl" in target else
                     not r["impl"].endswith(("-gram", "-cautious", "-normuon-hyperball", "-int8-momentum",
                                             "-triton-dispatch")))]
        best = max(rows, key=lambda r: r["speedup"], default=None)
        return (best["speedup"], best["impl"]) if best else (None, "not measured")
    names = target.get("reference")
    names = names if isinstance(names, list) else [names]
    if target["kind"] == "step_ratio":  # a variant's step against the default step of its backend: base ms / ms
        ms = {r["impl"]: r["ms"] for r in result.get("step", [])
              if r["model"] == target["model"] and r.get("width_divisor", 1) == 1}
        if target["impl"] not in ms or target["base"] not in ms:
            return None, "not measured"
        return ms[target["base"]] / ms[target["impl"]], f"{target['impl']} vs {target['base']}"
    if target["kind"] == "ns_auto_floor":  # the worst Newton–Schulz point of backend="auto"
        ratios = []
        for r in result.get("ns", []):
            if r["impl"] != "ours-auto":
                continue
            refs = [q["ms"] for q in result["ns"]
                    if q["impl"] in names and q["shape"] == r["shape"] and q["batch"] == r["batch"]]
            if refs:
                ratios.append((min(refs) / r["ms"], r["shape"], r["batch"]))
        if not ratios:
            return None, "not measured"
        worst, (m, n), batch = min(ratios)
        return worst, f"ours-auto at {m}x{n} x {batch}, the worst of {len(ratios)} points"
    if target["kind"] == "ns_speedup":
        here = [r for r in result.get("ns", []) if r["shape"] == target["shape"] and r["batch"] == target["batch"]]
        ref = min((r for r in here if r["impl"] in names), key=lambda r: r["ms"], default=None)
        # Same work as the reference: the standard recurrence (no -aol rows, which change the
        # preconditioning; -gram rows only where the target allows Gram NS; never the forced sm75
        # CUDA path, which no user gets by default on this GPU).
        excluded = ("-aol", "-sm75") if target.get("gram") else ("-gram", "-aol", "-sm75")
        if "impl" in target:  # one implementation's own target (a CUDA fallback path)
            ours = min((r for r in here if r["impl"] == target["impl"]), key=lambda r: r["ms"], default=None)
        else:
            ours = min((r for r in here if r["impl"].startswith("ours-") and not r["impl"].endswith(excluded)),
                       key=lambda r: r["ms"], default=None)
        if ref is None or ours is None:
            return None, "not measured"
        return ref["ms"] / ours["ms"], f"{ours['impl']} vs {ref['impl']}"
    rows = [r for r in result.get("update", []) if r["model"] == target["model"] and r["impl"].startswith("ours-")]
    best = max(rows, key=lambda r: r["fraction_of_copy"], default=None)
    return (best["fraction_of_copy"], best["impl"]) if best else (None, "not measured")


# The GPU test files, most important first (a run stopped by its budget loses the tail): the Triton
# kernels the product runs on, then the step graph, the variants, the measured dispatch, Gram NS,
# hardening. This process is bound by Triton compiling its kernels, one at a time on one core (cold,
# over 190 s of the tests' ~230 s share in the first run, with fewer tests).
GPU_TEST_FILES = ("test_triton_gpu.py", "test_graphs_gpu.py", "test_variants_gpu.py", "test_measured_gpu.py",
                  "test_ns_algorithms_gpu.py", "test_gpu_hardening.py")
# Run from the start in a second process beside it, so a budget cut never reaches them last: the CUDA
# extension's tests (no Triton compile; the first GPU run of its rewritten kernels), then the
# sanitizer's four runs over every kernel (each a fresh instrumented process, the longest tests).
# No test asserts a time, so the two processes sharing the GPU changes no outcome; the bench, which
# measures, starts after both.
SIDE_TEST_FILES = ("test_cuda_gpu.py", "test_sanitizer.py")
PROGRESS = "pytest-gpu-progress.txt"
JUNIT, SIDE_JUNIT = "pytest-gpu.xml", "pytest-gpu-side.xml"


def gpu_test_paths(tests: Path = REPO / "tests" / "gpu") -> tuple[list[str], list[str]]:
    """(the main process's files: GPU_TEST_FILES' order, then any file neither list names; the side
    process's: SIDE_TEST_FILES'), every tests/gpu file in one of them."""
    present = sorted(p.name for p in tests.glob("test_*.py"))
    listed = (*GPU_TEST_FILES, *SIDE_TEST_FILES)
    main = [*(f for f in GPU_TEST_FILES if f in present), *(f for f in present if f not in listed)]
    return [f"gpu/{name}" for name in main], [f"gpu/{name}" for name in SIDE_TEST_FILES if name in present]


def test_counts(junits: list[Path], progress: Path | None = None) -> dict:
    """Summed over the junit XMLs; from the progress log (both processes write it) where a run was
    stopped before writing its XML."""
    roots = []
    for junit in junits:
        try:
            roots.append(ET.parse(junit).getroot() if junit.is_file() else None)
        except ET.ParseError:  # cut off by a kill mid-write: the progress log still counts
            roots.append(None)
    if roots and all(root is not None for root in roots):
        suites = [s for root in roots for s in ([root] if root.tag == "testsuite" else list(root))]
        return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    if progress is not None and progress.is_file():
        outcomes = [line.split("\t", 1)[0] for line in progress.read_text().splitlines() if line]
        return {"tests": len(outcomes), "failures": outcomes.count("failed"), "errors": outcomes.count("error"),
                "skipped": outcomes.count("skipped"),
                "note": f"stopped before the end: counted from {progress.name}, which lists each test"}
    missing = [j.name for j, root in zip(junits, roots) if root is None]
    return {"tests": 0, "failures": 0, "errors": 1, "skipped": 0, "note": f"{', '.join(missing)} missing"}


# What a run writes into its folder besides the bench's JSON and plots: removed at the start, so a
# rerun into the same folder never reports an earlier run's files.
OWN_FILES = (JUNIT, "pytest-gpu.txt", SIDE_JUNIT, "pytest-gpu-side.txt", PROGRESS, "bench.txt", "summary.md")


def summary(out: Path, targets: list[dict], since: float = 0.0, commit: str = "unknown", note: str = "") -> str:
    """The summary of the run that started at wall time ``since`` (older bench JSON is ignored)."""
    counts = test_counts([out / JUNIT, out / SIDE_JUNIT], out / PROGRESS)
    results = sorted((p for p in out.glob("*.json") if p.stat().st_mtime >= since), key=lambda p: p.stat().st_mtime)
    result = json.loads(results[-1].read_text()) if results else {}
    lines = [f"# gpu-check: {result.get('device', 'no bench result')}", "", f"commit: {commit}", "",
             "tests/gpu: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
    if note:
        lines += [note, ""]
    if result:
        lines.append(f"bench: {results[-1].name}, complete={result.get('complete')}, "
                     f"skipped {len(result.get('skipped', []))} items, {len(result.get('errors', []))} failed")
        lines += [f"- failed: {section} {what}: {error}" for section, what, error in result.get("errors", [])]
    lines += ["", "| target | needs | measured | by | verdict |", "|---|---|---|---|---|"]
    for t in targets:
        value, by = measure(t, result)
        verdict = "not measured" if value is None else ("met" if value >= t["min"] else "MISSED")
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"| {t['name']} | >= {t['min']} | {shown} | {by} | {verdict} |")
    lines += ["", "Commit under bench/results/: the JSON, the PNGs, pytest-gpu.xml/txt, pytest-gpu-side.xml/txt, "
              f"{PROGRESS} and this summary; then run",
              "`python bench/crossovers.py` and summarise in bench/README.md (misses included)."]
    return "\n".join(lines) + "\n"


class Stopped(Exception):
    """A SIGTERM reached gpu-check (``timeout`` ran out): the running phase is stopped, the summary written."""


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


# Every step's process running now (two at once while the tests run): a SIGTERM reaches the main
# thread only, which stops them all.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    with _LIVE_LOCK:
        for child in _LIVE:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> int:
    # From tests/: `python -m pytest` puts its working directory on sys.path, and from the repository
    # root that would import the source tree's muon_kernels (no _C, no triton_kernels) instead of
    # the installed package.
    # Its own session, killed as a whole at the timeout or when gpu-check itself is stopped: the
    # tests start processes of their own (compute-sanitizer runs, a resumed training), which would
    # otherwise outlive it and hold the GPU while the next command measures.
    with log.open("w") as f:
        child = subprocess.Popen(cmd, cwd=REPO / "tests", stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(child)
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            _reap(child)
            f.write(f"\n[gpu-check] stopped after {timeout:.0f} s (its share of the budget)\n")
            return 124
        except BaseException:
            os.killpg(child.pid, signal.SIGKILL)
            _reap(child)
            f.write("\n[gpu-check] stopped with gpu-check itself\n")
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(child)


def _reap(child: subprocess.Popen) -> None:
    """Wait for a killed child by its pid, not ``Popen.wait``: a SIGTERM whose handler raised inside
    ``wait(timeout=…)`` can leave Popen's internal lock taken (CPython), and a second ``wait()``
    then blocks for good (seen twice in ~1,000 signals)."""
    try:
        os.waitpid(child.pid, 0)
    except ChildProcessError:  # reaped already
        pass


def _pytest(paths: list[str], junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={junit}"]


def main(argv=None, runner=_run, clock=time.monotonic) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.5, help="whole budget, tests and bench together")
    parser.add_argument("--tests-share", type=float, default=0.45, help="the tests' part of the budget (0 to 1)")
    parser.add_argument("--started", type=float, default=None,
                        help="wall time (epoch seconds) the budget started at: the Makefile's, before the build")
    parser.add_argument("--note", default="", help="a line for the summary (the Makefile's: a failed _C build)")
    args = parser.parse_args(argv)
    if not 0.0 < args.tests_share < 1.0:
        parser.error(f"--tests-share must be between 0 and 1, got {args.tests_share}")
    targets = load_targets()
    commit = git_commit()  # checked now, not after the tests: the bench names its JSON with it
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    since = time.time()
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
    start = clock()
    before = max(0.0, since - args.started) if args.started is not None else 0.0  # the build's time
    notes = [args.note] if args.note else []
    if before > 60.0 * args.minutes - 60.0:
        notes.append(f"the build took {before:.0f} s of the {60 * args.minutes:.0f} s budget: one minute left to run in")
    total = max(60.0, 60.0 * args.minutes - before)
    # The tests' measured dispatch choices (made with NaN-filled buffers) go to a file of their own,
    # not to the user's cache the bench reads.
    env = dict(os.environ, MUON_KERNELS_DEBUG_FILL="nan", MUON_KERNELS_TEST_PROGRESS=str(out / PROGRESS),
               MUON_KERNELS_DISPATCH_CACHE=str(out / "tests-dispatch" / "dispatch.json"))
    previous = signal.signal(signal.SIGTERM, _stop)
    tests_rc = bench_rc = None
    note = " ".join(notes)
    try:
        # Tests first (correctness before speed), their share of the budget, in two processes at
        # once (SIDE_TEST_FILES); the bench gets what is left less a reserve for the item that is
        # running when its budget ends, the plots and this summary. A file that fails to import
        # costs its own tests, not the run's.
        main_paths, side_paths = gpu_test_paths()
        side_rc: list = [None]

        def side():
            try:
                side_rc[0] = runner(_pytest(side_paths, out / SIDE_JUNIT), out / "pytest-gpu-side.txt",
                                    args.tests_share * total, env)
            except BaseException as exc:  # stopped with gpu-check: reported by the main thread
                side_rc[0] = exc

        side_thread = threading.Thread(target=side, daemon=True)
        side_thread.start()
        try:
            main_rc = runner(_pytest(main_paths, out / JUNIT), out / "pytest-gpu.txt", args.tests_share * total, env)
            side_thread.join()
        except BaseException:  # a SIGTERM (Stopped) reaches this thread only: stop the side process too
            _stop_all()
            side_thread.join()
            raise
        if not isinstance(side_rc[0], int):
            notes.append(f"The side tests' process raised {side_rc[0]!r}.")
            note = " ".join(notes)
        tests_rc = main_rc or (side_rc[0] if isinstance(side_rc[0], int) else 1)
        (out / "summary.md").write_text(summary(out, targets, since, commit, note))  # should the bench not end
        bench_env = {k: v for k, v in os.environ.items() if k != "MUON_KERNELS_TEST_PROGRESS"}  # no debug fill
        bench_minutes = max(0.5, (total - (clock() - start)) / 60.0 - 1.5)
        bench_rc = runner([sys.executable, str(BENCH / "run.py"), "--out-dir", str(out), "--budget-minutes",
                           f"{bench_minutes:.2f}"], out / "bench.txt", 60.0 * (bench_minutes + 1.0), bench_env)
    except Stopped as exc:
        note = " ".join([*notes, f"gpu-check was {exc} during the {'tests' if tests_rc is None else 'bench'}."])
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = summary(out, targets, since, commit, note)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"[gpu-check] tests exit {tests_rc}, bench exit {bench_rc}, {clock() - start:.0f} s; files in {out}")
    return 0 if tests_rc == 0 and bench_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
