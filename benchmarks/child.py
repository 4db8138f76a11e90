"""Measures one (library, mode, problem) in its own process; prints one JSON line.

    python benchmarks/child.py LIB PROBLEM --reps N --ref REF.npz
    python benchmarks/child.py --reference PROBLEM --ref REF.npz

Peak memory is measured in a process of its own (`--memory-only`, started with
MALLOC_MMAP_THRESHOLD_ fixed so that freed large buffers go back to the OS and a warm
heap cannot hide a later peak); timings run in another process with the default malloc.

Order inside the process: build -> first forward+backward and first forward (trace /
compile / warm-up, timed) -> peak memory of one forward+backward (the resident-set
high-water mark, reset just before the call via /proc/self/clear_refs, minus the resident
set just before: the increase over a warm baseline) -> N timed forwards and N timed
forward+backwards (medians) -> evaluation counts (may run an extra, separately compiled,
instrumented solve) -> one isolated evaluation of f and of f + its VJP -> errors against
the float64 reference.
"""

import argparse
import gc
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def reference(problem, path):
    import tensorflow as tf

    from runners import TfacaRunner

    r = TfacaRunner(problem, "aca", dtype="float64", rtol=1e-10, atol=1e-10, max_steps=200000)
    t0 = time.perf_counter()
    yT, grads = r.fwdbwd()
    np.savez(path, yT=yT, *grads)
    c = r.counts()
    print(json.dumps(dict(problem=problem, seconds=time.perf_counter() - t0, **c,
                          tf=tf.__version__)))


def measure(lib, problem, reps, ref_path, memory_only=False, budget=60.0, quick=False):
    from runners import LIBS

    out = dict(lib=lib, problem=problem, reps=reps)
    t0 = time.perf_counter()
    runner = LIBS[lib][2](problem)
    out["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    yT, grads = runner.fwdbwd()
    out["first_fwdbwd_s"] = time.perf_counter() - t0
    if memory_only:  # the first call was the warm-up (trace, compile, allocator)
        del yT, grads
        gc.collect()
        base = _status_kb("VmRSS")
        if _reset_hwm():
            runner.fwdbwd()
            peak = _status_kb("VmHWM")
            out["mem_fwdbwd_mb"] = (peak - base) / 1024.0
            out["mem_method"] = "VmHWM after clear_refs minus VmRSS before"
        else:  # fall back to ru_maxrss (a high-water mark that cannot be reset)
            import resource
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            runner.fwdbwd()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["mem_fwdbwd_mb"] = (after - before) / 1024.0
            out["mem_method"] = "ru_maxrss increase"
        out["rss_baseline_mb"] = base / 1024.0
        return out

    t0 = time.perf_counter()
    runner.fwd()
    out["first_fwd_s"] = time.perf_counter() - t0

    from runners import _median_time

    # Repetitions: `reps`, fewer when one call is slow (at most ~`budget` s per kind).
    def n_for(first):
        return max(1, min(reps, int(budget / max(first, 1e-9))))

    out["fwd_s"] = _median_time(runner.fwd, n_for(out["first_fwd_s"]))
    out["reps_fwd"] = n_for(out["first_fwd_s"])
    if quick and out["first_fwdbwd_s"] > budget:
        # --quick: a call this slow is not repeated; its time includes the compile.
        out["fwdbwd_s"] = out["first_fwdbwd_s"]
        out["reps_fwdbwd"] = 0
        runner.slow = True
    else:
        out["fwdbwd_s"] = _median_time(runner.fwdbwd, n_for(out["first_fwdbwd_s"]))
        out["reps_fwdbwd"] = n_for(out["first_fwdbwd_s"])
    out["compile_fwdbwd_s"] = max(out["first_fwdbwd_s"] - out["fwdbwd_s"], 0.0)
    out["compile_fwd_s"] = max(out["first_fwd_s"] - out["fwd_s"], 0.0)

    out.update(runner.counts())
    out["vjp_rule"] = runner.vjp_rule
    t_f, t_vjp = runner.vf_time(max(reps * 3, 10))
    out["t_f_s"], out["t_vjp_s"] = t_f, t_vjp

    ref = np.load(ref_path)
    ref_y = ref["yT"]
    ref_g = [ref[f"arr_{i}"] for i in range(len(grads))]
    out["err_y"] = _rel(yT, ref_y)
    out["err_grad_y0"] = _rel(grads[0], ref_g[0])
    out["err_grad_w"] = _rel(np.concatenate([g.ravel() for g in grads[1:]]),
                             np.concatenate([g.ravel() for g in ref_g[1:]]))
    out["finite"] = bool(np.all(np.isfinite(yT)) and all(np.all(np.isfinite(g)) for g in grads))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib", nargs="?")
    ap.add_argument("problem", nargs="?")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--reference", metavar="PROBLEM")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.reference:
        reference(a.reference, a.ref)
        return
    try:
        out = measure(a.lib, a.problem, a.reps, a.ref, a.memory_only, a.budget, a.quick)
    except Exception as e:  # reported in the table, never hidden
        msg = [x for x in str(e).splitlines() if x.strip()]
        msg = " ".join(x for x in msg if "rror" in x or "failed" in x or "reached" in x)[-400:]
        out = dict(lib=a.lib, problem=a.problem, error=f"{type(e).__name__}: {msg}",
                   traceback=traceback.format_exc()[-3000:])
    print("@@RESULT@@" + json.dumps(out))


if __name__ == "__main__":
    main()
