"""MALI and ACA with a checkpoint budget: speed and gradient error; writes mali_speed.md.

    python benchmarks/mali_speed.py [--problems mlp,conv] [--libs ...] [--reps 3]
                                    [--budget 90] [--no-memory] [--out benchmarks/mali_speed.md]
                                    [--python PYTHON] [--render-only]

Entries (benchmarks/runners.py): tfaca ALF + MALI in a plain `tf.function` and under
`tf.function(jit_compile=True)`, TorchDiffEqPack `odesolve_adjoint_sym12` (its MALI,
method "sym12async"), both at `runners.MALI_TOL`; tfaca ACA (Dopri5) at the problem's
tolerances, with every checkpoint and with `ACAGradient(checkpoints=K)`, K ~ sqrt(accepted
steps). Each (entry, problem) runs in a child process of its own (benchmarks/child.py,
as run.py does: times are medians after a warm-up call, errors against the cached float64
references), and peak memory in a second child unless --no-memory. Run it with the
interpreter that has the peers (/work/benchvenv/bin/python). The report is rendered from
the measured numbers only (`--render-only` re-renders the saved ones).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402
from problems import SPECS  # noqa: E402
from runners import MALI_TOL  # noqa: E402

ORDER = ["tfaca-mali", "tfaca-mali-xla", "tdep-mali", "tfaca-aca", "tfaca-aca-budget"]
LABELS = {
    "tfaca-mali": ("tfaca", "ALF + MALI, tf.function"),
    "tfaca-mali-xla": ("tfaca", "ALF + MALI, tf.function(jit_compile=True)"),
    "tdep-mali": ("TorchDiffEqPack", "odesolve_adjoint_sym12 (MALI, sym12async)"),
    "tfaca-aca": ("tfaca", "ACA Dopri5, every checkpoint, tf.function"),
    "tfaca-aca-budget": ("tfaca", "ACA Dopri5, ACAGradient(checkpoints=K), tf.function"),
}
MALI_TARGET = 0.5
BUDGET_TARGET = 1.5
# Two gradients of the same steps differ by rounding only: tfaca's error counts as equal
# to TorchDiffEqPack's within this relative margin.
EQUAL_MARGIN = 0.10
DEFAULT_JSON = os.path.join(HERE, ".cache", "mali_speed_results.json")
# XLA on CPU runs the gradient of a convolution inside a while loop 20-100x slower than
# TensorFlow's kernels (benchmarks/xla_conv_loop.py; conv ACA under XLA: ~50 s in
# BENCHMARKS.md), and MALI takes ~7x ACA's steps on conv: this entry gets a short timeout
# (seconds) and is reported as timed out rather than holding the run for tens of minutes.
SHORT_TIMEOUT = {("tfaca-mali-xla", "conv"): 240.0}


# The tolerances the ALF's step count is probed at (forward solves only): the problem's,
# and the MALI reference code's range.
PROBE_TOLS = [(1e-3, 1e-6), (1e-2, 1e-3), (1e-3, 1e-3)]


def probe_steps(problem):
    """Accepted/rejected ALF steps of a forward solve (no gradient) at PROBE_TOLS: the
    numbers behind the choice of MALI_TOL. Runs in a child process (TensorFlow only)."""
    import tensorflow as tf

    import tfaca
    from problems import make
    from runners import _tf_vf

    p = make(problem)
    ws = [tf.constant(w) for _, w in p["weights"]]
    f = _tf_vf(tf, problem, ws)
    y0 = tf.constant(p["y0"])
    ts = tf.constant([0.0, SPECS[problem]["t1"]])
    out = {}
    for rtol, atol in PROBE_TOLS:
        sol = tf.function(lambda y0: tfaca.solve(  # noqa: B023
            lambda t, y: f(y), y0, ts, method="alf", gradient="mali", rtol=rtol, atol=atol,
            max_steps=50000, throw=False))(y0)
        out[f"{rtol:g}/{atol:g}"] = dict(steps=int(sol.stats.num_steps),
                                         rejected=int(sol.stats.num_rejected),
                                         status=str(int(sol.status)))
    return out


def _probe_child(python, problem, timeout):
    import subprocess

    env = dict(os.environ)
    env.update(run.BASE_ENV)
    env["PYTHONPATH"] = run.ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--probe-steps", problem],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@@PROBE@@"):
            return json.loads(line[len("@@PROBE@@"):])
    return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])


def probe_text(probes, problems):
    lines = []
    for p in problems:
        pr = probes.get(p)
        if not pr:
            continue
        if "error" in pr:
            lines.append(f"  - {p}: probe failed: {pr['error']}")
            continue
        spec = f"{SPECS[p]['rtol']:g}/{SPECS[p]['atol']:g}"
        parts = []
        for (rtol, atol) in PROBE_TOLS:
            k = f"{rtol:g}/{atol:g}"
            v = pr.get(k)
            if v is None:
                continue
            tag = " (the problem's)" if k == spec else (
                " (chosen)" if (rtol, atol) == (MALI_TOL["rtol"], MALI_TOL["atol"]) else "")
            st = "" if v["status"] == "0" else f", status {v['status']} (not finished)"
            parts.append(f"rtol/atol {k}{tag}: {v['steps']} accepted / {v['rejected']} "
                         f"rejected{st}")
        lines.append(f"  - {p}: " + "; ".join(parts))
    return "\n".join(lines)


def floor_s(r, kernels=None):
    """The zero-overhead time of forward+backward: the entry's f-evaluations times one
    isolated f, plus its VJPs times one isolated f + VJP (see the report's notes); with
    `kernels`, another entry, timed with that entry's isolated f and f + VJP."""
    t_f, t_vjp = (kernels or r).get("t_f_s"), (kernels or r).get("t_vjp_s")
    nf, nb, steps = r.get("nfe_fwd"), r.get("nfe_bwd"), r.get("steps")
    if not t_f or not t_vjp or nf is None or nb is None:
        return None
    rule = r.get("vjp_rule")
    if rule == "bwd":  # tfaca ACA, MALI: every backward evaluation comes with its VJP
        return nf * t_f + nb * t_vjp
    if rule == "budget":  # half the backward evaluations rebuild the segment, no VJP
        return nf * t_f + nb / 2 * t_f + nb / 2 * t_vjp
    if rule == "tdep-mali" and steps is not None:
        # per step: the inverse (f, no graph) and the step again with a graph + its VJP;
        # plus one f at t1 (dL/dt1)
        return (nf + nb - steps) * t_f + steps * t_vjp
    return None


def _ms(x):
    return run._ms(x)


def _sci(x):
    return run._sci(x)


def _get(results, lib, p):
    r = results.get((lib, p))
    return None if r is None or "error" in r else r


def _tol(r, p):
    if r.get("rtol") is not None:
        return f"{r['rtol']:g} / {r['atol']:g}"
    return f"{SPECS[p]['rtol']:g} / {SPECS[p]['atol']:g}"


def table(results, problems):
    head = ("| problem | library | mode | rtol / atol | fwd ms | fwd+bwd ms (runs) | "
            "trace/compile s | steps acc/rej | f-evals fwd / bwd | f+b ms per step | "
            "zero-overhead floor ms | rel err y(T) | rel err dL/dy0 | rel err dL/dθ | "
            "peak mem f+b MB |")
    lines = [head, "|" + "---|" * 15]
    for p in problems:
        for lib in ORDER:
            if (lib, p) not in results:
                continue
            r = results[(lib, p)]
            name, mode = LABELS[lib]
            if "error" in r:
                what = "DID NOT FINISH" if r["error"].startswith("timed out") else "FAILED"
                lines.append(f"| {p} | {name} | {mode} | {what}: {r['error'][:200]} |"
                             + " |" * 11)
                continue
            if lib == "tfaca-aca-budget" and r.get("checkpoints"):
                mode = mode.replace("=K", f"={r['checkpoints']}")
            steps = r.get("steps")
            st = f"{steps}/{run._num(r.get('rejected'))}" if steps is not None else "n/a"
            per_step = f"{r['fwdbwd_s'] / steps * 1e3:.3g}" if steps else "n/a"
            fl = floor_s(r)
            lines.append(
                f"| {p} | {name} | {mode} | {_tol(r, p)} | {_ms(r['fwd_s'])} | "
                f"{_ms(r['fwdbwd_s'])} ({r.get('reps_fwdbwd')}) | "
                f"{r['compile_fwdbwd_s']:.1f} | {st} | "
                f"{run._num(r.get('nfe_fwd'))} / {run._num(r.get('nfe_bwd'))} | {per_step} | "
                f"{_ms(fl)} | {run.error_memory_cells(r)} |")
    return "\n".join(lines)


def _errors_no_worse(a, b):
    """(verdict word, detail) for tfaca entry a against peer b: both gradient errors."""
    worse = [k for k in ("err_grad_y0", "err_grad_w") if a[k] > b[k] * (1 + EQUAL_MARGIN)]
    better = all(a[k] < b[k] / (1 + EQUAL_MARGIN) for k in ("err_grad_y0", "err_grad_w"))
    word = "worse" if worse else ("better" if better else "equal or better")
    return word, (f"dL/dy0 {a['err_grad_y0']:.3e} vs {b['err_grad_y0']:.3e}, dL/dθ "
                  f"{a['err_grad_w']:.3e} vs {b['err_grad_w']:.3e}")


def _breakdown(r):
    """Where an entry's time goes: forward, backward, per step, against its floor."""
    bwd = r["fwdbwd_s"] - r["fwd_s"]
    fl = floor_s(r)
    s = (f"fwd {_ms(r['fwd_s'])} + bwd {_ms(bwd)} ms; isolated f {r['t_f_s'] * 1e3:.3f} ms, "
         f"f+VJP {r['t_vjp_s'] * 1e3:.3f} ms")
    if fl:
        s += f"; zero-overhead floor {_ms(fl)} ms ({r['fwdbwd_s'] / fl:.2f}x of it is spent)"
    return s


def _floor_note(results, problems):
    over = [f"{p} {LABELS[lib][1]}" for p in problems for lib in ORDER
            if _get(results, lib, p) and floor_s(results[(lib, p)])
            and floor_s(results[(lib, p)]) > results[(lib, p)]["fwdbwd_s"]]
    if not over:
        return ""
    return ("\n\nThe floor is above the measured time for " + "; ".join(over) + ": there one "
            "isolated call of f (a call of its own tf.function or torch module) costs more in "
            "call overhead than f inside the solver's loop, so the floor says nothing about "
            "those entries; their per-step time is the figure to compare.")


def verdicts(results, problems):
    out = []
    for p in problems:
        peer = _get(results, "tdep-mali", p)
        modes = {k: _get(results, k, p) for k in ("tfaca-mali", "tfaca-mali-xla")}
        modes = {k: v for k, v in modes.items() if v}
        if not peer or not modes:
            missing = "TorchDiffEqPack MALI" if not peer else "tfaca MALI"
            out.append(f"- **{p} (a)** time tfaca MALI / TorchDiffEqPack MALI: n/a, {missing} "
                       f"did not run (target ≤ {MALI_TARGET:g}: MISS)")
        else:
            best = min(modes, key=lambda k: modes[k]["fwdbwd_s"])
            a = modes[best]
            v = a["fwdbwd_s"] / peer["fwdbwd_s"]
            word, detail = _errors_no_worse(a, peer)
            out.append(
                f"- **{p} (a)** time tfaca MALI / TorchDiffEqPack MALI, fwd+bwd, on tfaca's "
                f"faster mode ({LABELS[best][1]}): {_ms(a['fwdbwd_s'])} / "
                f"{_ms(peer['fwdbwd_s'])} ms = **{v:.2f}** (target ≤ {MALI_TARGET:g}: "
                f"**{run._verdict(v, MALI_TARGET)}**); gradient error {word} "
                f"({detail}; steps {a.get('steps')} vs {peer.get('steps')})")
            for k, r in modes.items():
                w, d = _errors_no_worse(r, peer)
                out.append(f"  - {LABELS[k][1]}: {_ms(r['fwdbwd_s'])} ms = "
                           f"{r['fwdbwd_s'] / peer['fwdbwd_s']:.2f} × TorchDiffEqPack "
                           f"(forward alone {r['fwd_s'] / peer['fwd_s']:.2f} ×); gradient "
                           f"error {w} ({d})")
            if v > MALI_TARGET:
                for k, r in list(modes.items()) + [("tdep-mali", peer)]:
                    out.append(f"  - {LABELS[k][1]}: {_breakdown(r)}")
                fl = floor_s(a)
                if fl and fl < a["fwdbwd_s"]:
                    f = fl / peer["fwdbwd_s"]
                    out.append(
                        f"  - zero-overhead floor of {LABELS[best][1]} / TorchDiffEqPack's "
                        f"measured time: {_ms(fl)} / {_ms(peer['fwdbwd_s'])} ms = {f:.2f}"
                        + (f" > {MALI_TARGET:g}: even with no loop overhead at all, tfaca's own "
                           "evaluations of f and its VJPs would miss the target; the cost of "
                           "the vector field's kernels dominates" if f > MALI_TARGET else
                           f" ≤ {MALI_TARGET:g}: the loop's overhead is what misses it"))
                    cross = floor_s(a, kernels=peer)
                    if cross:
                        out.append(
                            f"  - the same floor with TorchDiffEqPack's kernels (its isolated "
                            f"f and f+VJP times, tfaca's evaluation counts): {_ms(cross)} / "
                            f"{_ms(peer['fwdbwd_s'])} ms = {cross / peer['fwdbwd_s']:.2f}")
        full, bud = _get(results, "tfaca-aca", p), _get(results, "tfaca-aca-budget", p)
        if not full or not bud:
            out.append(f"- **{p} (b)** time budgeted ACA / full ACA: n/a, an entry did not run "
                       f"(target ≤ {BUDGET_TARGET:g}: MISS)")
            continue
        v = bud["fwdbwd_s"] / full["fwdbwd_s"]
        same = (abs(bud["err_grad_y0"] - full["err_grad_y0"]) <= 0.01 * full["err_grad_y0"]
                and abs(bud["err_grad_w"] - full["err_grad_w"]) <= 0.01 * full["err_grad_w"])
        mem = ""
        if bud.get("mem_fwdbwd_mb") is not None and full.get("mem_fwdbwd_mb"):
            mem = (f"; peak memory {bud['mem_fwdbwd_mb']:.1f} / {full['mem_fwdbwd_mb']:.1f} MB "
                   f"= {bud['mem_fwdbwd_mb'] / full['mem_fwdbwd_mb']:.2f}")
        out.append(
            f"- **{p} (b)** time ACA with checkpoints={bud.get('checkpoints')} (full ACA: "
            f"{bud.get('full_aca_steps')} accepted steps, K = round(sqrt)) / full ACA, fwd+bwd, "
            f"tf.function: {_ms(bud['fwdbwd_s'])} / {_ms(full['fwdbwd_s'])} ms = **{v:.2f}** "
            f"(target ≤ {BUDGET_TARGET:g}: **{run._verdict(v, BUDGET_TARGET)}**); gradient "
            f"errors {'the same' if same else 'DIFFERENT'} ({_sci(bud['err_grad_y0'])} / "
            f"{_sci(bud['err_grad_w'])} vs {_sci(full['err_grad_y0'])} / "
            f"{_sci(full['err_grad_w'])}){mem}")
        if v > BUDGET_TARGET:
            for k, r in (("tfaca-aca-budget", bud), ("tfaca-aca", full)):
                out.append(f"  - {LABELS[k][1]}: {_breakdown(r)}")
    return "\n".join(out)


def render(results, problems, meta):
    versions = meta.get("versions") or {}
    ver = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    specs = "\n".join(f"- **{p}**: {SPECS[p]['desc']}, t ∈ [0, {SPECS[p]['t1']:g}]"
                      for p in problems)
    return f"""# MALI and ACA with a checkpoint budget: speed and gradient error

Generated by `{meta['command']}` on {meta['date']} in {meta['total_s'] / 60:.1f} min
(method: benchmarks/README.md; this script: benchmarks/mali_speed.py).

- Machine: {meta['cpu']}; CPU only, float32, Python {meta['python']}. The machine is
  shared with other jobs (load average {meta.get('load_start', 'n/a')} at the start of the
  run, {meta.get('load_end', 'n/a')} at its end, on 2 cores): compare entries of one run,
  not runs.
- Versions: {ver}.
- Times: medians of up to {meta['reps']} forward+backward calls after a warm-up call (fewer
  when one call takes more than {meta['budget']:g} s / {meta['reps']}; the count is in
  parentheses), each entry in a child process of its own; "trace/compile" = first call −
  median. Errors: relative 2-norm errors against tfaca ACA in float64 at rtol = atol =
  1e-10 (the same references as BENCHMARKS.md). Peak memory: resident-set increase of one
  forward+backward over a warm baseline, in a separate child
  process{' (not measured in this run)' if not meta.get('memory') else ''}.
- **Tolerances.** MALI (tfaca ALF and TorchDiffEqPack sym12async) runs at rtol =
  {MALI_TOL['rtol']:g}, atol = {MALI_TOL['atol']:g} on both problems, not at the problems'
  tolerances: the ALF's error estimate h (u − v) is of first order, and at the problems'
  atol = 1e-6 it takes far more steps than Dopri5 does. rtol = {MALI_TOL['rtol']:g}, atol =
  {MALI_TOL['atol']:g} is in the range the MALI reference code suggests (rtol 1e-2..1e-3,
  atol 1e-3). Accepted ALF steps of a tfaca forward solve in this run, per tolerance:
{probe_text(meta.get('probes') or {}, problems) or '  (not probed in this run)'}

  The ACA entries run at the problems' tolerances, so the MALI rows are not comparable
  with the ACA rows in error, nor in time.

Problems:
{specs}

## Results

{table(results, problems)}

"f+b ms per step": forward+backward time over accepted steps. "Zero-overhead floor": the
entry's f-evaluations × one isolated f plus its VJPs × one isolated f + VJP, in the same
library and compile mode: tfaca MALI evaluates f once per trial forward and once with
its VJP per step backward (the inverse step's evaluation is the one whose VJP it takes);
TorchDiffEqPack's MALI evaluates f twice per accepted step forward (the trial without a
graph, then the accepted step again) and, backward, once for the inverse and once more,
with a graph, for the VJP of the step; budgeted ACA rebuilds each step's stages forward
(f-evaluations) before it replays them (VJPs).{_floor_note(results, problems)}

## Verdicts

(a) tfaca MALI / TorchDiffEqPack MALI, same tolerances; tfaca's gradient error counts as
equal when within {EQUAL_MARGIN:.0%} of the peer's (two gradients of the same steps differ
by rounding). (b) ACA with K ≈ sqrt(accepted steps) checkpoints / ACA with every
checkpoint, both a plain tf.function.

{verdicts(results, problems)}
"""


def _load():
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mlp,conv")
    ap.add_argument("--libs", default=",".join(ORDER))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=90.0,
                    help="seconds per kind of call (forward, forward+backward) and entry")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per child")
    ap.add_argument("--out", default=os.path.join(HERE, "mali_speed.md"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--probe-steps", metavar="PROBLEM", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe_steps:  # child mode: ALF step counts at PROBE_TOLS
        print("@@PROBE@@" + json.dumps(probe_steps(a.probe_steps)), flush=True)
        return None
    problems = [p for p in a.problems.split(",") if p]
    libs = [x for x in a.libs.split(",") if x]
    for x in libs:
        if x not in LABELS:
            ap.error(f"unknown entry {x!r}; choose from {ORDER}")

    if a.render_only:
        with open(a.json) as fh:
            saved = json.load(fh)
        results = {tuple(k.split("|")): v for k, v in saved["results"].items()}
        meta = saved["meta"]
        problems = [p for p in problems if any(k[1] == p for k in results)]
    else:
        start = time.perf_counter()
        load_start = _load()
        results = {}
        probes = {}
        for p in problems:
            probes[p] = _probe_child(a.python, p, a.timeout)
            print(f"[{time.perf_counter() - start:6.0f}s] {p:5s} ALF steps per tolerance: "
                  f"{probes[p]}", flush=True)
            path = run._ref_path(p)
            if not os.path.exists(path):
                print(f"[ref] {p}: float64 tfaca ACA at rtol=atol=1e-10 ...", flush=True)
                info, err, wall = run._run_child(a.python, ["--reference", p, "--ref", path],
                                                 {}, 3600)
                if err:
                    print(f"[ref] {p} FAILED: {err}", flush=True)
            for lib in libs:
                if not os.path.exists(path):
                    results[(lib, p)] = dict(error="no reference solution")
                    continue
                args = [lib, p, "--reps", str(a.reps), "--ref", path, "--budget", str(a.budget)]
                timeout = min(a.timeout, SHORT_TIMEOUT.get((lib, p), a.timeout))
                r, err, wall = run._run_child(a.python, args, {}, timeout)
                if err:
                    r = dict(error=err)
                if not a.no_memory and "error" not in r:
                    m, merr, mwall = run._run_child(a.python, args + ["--memory-only"],
                                                    run.MEM_ENV, timeout)
                    wall += mwall
                    if merr or "error" in m:
                        r["mem_fwdbwd_mb"] = None
                        r["mem_error"] = merr or m.get("error")
                    else:
                        r["mem_fwdbwd_mb"] = m["mem_fwdbwd_mb"]
                results[(lib, p)] = r
                msg = r.get("error") or (f"fwd {_ms(r['fwd_s'])} ms, f+b {_ms(r['fwdbwd_s'])} ms, "
                                         f"steps {r.get('steps')}, mem "
                                         f"{run._num(r.get('mem_fwdbwd_mb'), '{:.1f}')} MB")
                print(f"[{time.perf_counter() - start:6.0f}s] {p:5s} {lib:17s} {wall:6.1f}s wall  "
                      f"{msg[:300]}", flush=True)
        cmd = [os.path.relpath(a.python) if a.python.startswith(run.ROOT) else a.python,
               "benchmarks/mali_speed.py"]
        if a.problems != "mlp,conv":
            cmd.append(f"--problems {a.problems}")
        if a.libs != ",".join(ORDER):
            cmd.append(f"--libs {a.libs}")
        if a.reps != 3:
            cmd.append(f"--reps {a.reps}")
        if a.budget != 90.0:
            cmd.append(f"--budget {a.budget:g}")
        if a.no_memory:
            cmd.append("--no-memory")
        meta = dict(command=" ".join(cmd), load_start=load_start, load_end=_load(), date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    total_s=time.perf_counter() - start, cpu=run._cpu(),
                    python=platform.python_version(), versions=run._versions(a.python),
                    reps=a.reps, budget=a.budget, memory=not a.no_memory, probes=probes)
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "results": {f"{k[0]}|{k[1]}": v for k, v in results.items()}},
                      fh, indent=1)
    md = render(results, problems, meta)
    run.write_report(a.out, md)
    return results


if __name__ == "__main__":
    main()
