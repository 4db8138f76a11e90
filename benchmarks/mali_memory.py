"""Peak memory against the number of steps: ACA, ACA with a checkpoint budget, MALI,
naive and the adjoint (issue 14); and the rounding drift of ALF's inverse.

    python benchmarks/mali_memory.py [--quick] [--modes mali,...] [--render-only]
                                     [--out benchmarks/mali_memory.md]

The field: a 1x1-convolution network on a 64x64x32 float32 feature map (512 KiB of
state), `dy/dt = tanh(y W1) W2` over the channels, t in [0, 1], batch 1. The number of
steps is set by a fixed step size 1/N (N = 100, 1,000, 10,000), so every mode takes
the same N steps (ALF for MALI, Dopri5 for the others): memory is what is measured.

Each (mode, N) runs in processes of their own, with TensorFlow's inter-op and intra-op
threads set to 1 (fewer orders in which independent operations can run, so fewer sets of
buffers that can coexist): one forward+backward in a `tf.function` (jit_compile=False,
the path Keras takes on CPU and under tf.distribute) as a warm-up, then measured calls
(`MEASURE[mode]`: processes x calls). Which operations overlap still varies with timing
from call to call and process to process (MALI's peak by several states), so an entry
is the median of its calls, with their range. Peak memory is measured two ways:

- tensors: TensorFlow's CPU allocator set to BFC (`TF_CPU_ALLOCATOR_USE_BFC=true`),
  whose statistics count every tensor's bytes: the peak during the call minus what
  was allocated before it (`tf.config.experimental.get_memory_info`). Exact, and what
  the table and the targets use;
- process: the peak resident memory above the resident memory before the call
  (`/proc/self/status` VmHWM after resetting it, minus VmRSS), which also sees the
  allocator's and malloc's slack (it can read below the tensors' bytes when the call
  reuses memory the warm-up left resident).

Naive stops at 100 steps (its tape holds every stage of every step, 24 states per
step: 12 GB at 1,000).

The drift table: the ALF steps of a solve inverted from its end (what MALI's backward
pass does) give back the start to rounding; the largest relative error of the rebuilt
`y0`, float32 and float64, for the same field and N.

Prints markdown and writes it to `--out`.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPE = (1, 64, 64, 32)
BUDGET = 100
MODES = ["aca", "aca-budget", "mali", "naive", "adjoint"]
STATE_MB = 4 * 64 * 64 * 32 / 2**20
# Measured (processes, calls per process) per entry: more where the spread across N is
# the target, fewer where one call takes minutes and gigabytes.
MEASURE = {"mali": (5, 2), "adjoint": (1, 3), "aca-budget": (1, 2), "aca": (1, 1),
           "naive": (1, 1)}
NAIVE_MAX = 100


def _field(tf, dtype):
    rng = __import__("numpy").random.default_rng(0)
    c = SHAPE[-1]
    w1 = tf.Variable(rng.normal(size=(c, c)) / c**0.5, dtype=dtype)
    w2 = tf.Variable(rng.normal(size=(c, c)) / c**0.5, dtype=dtype)

    def f(t, y):
        return tf.tensordot(tf.tanh(tf.tensordot(y, w1, 1)), w2, 1)

    y0 = tf.constant(rng.normal(size=SHAPE), dtype)
    return f, y0, [w1, w2]


def child(mode, n):
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # allocator statistics on CPU
    import tensorflow as tf

    import tfaca
    from child import _reset_hwm, _status_kb

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    f, y0, weights = _field(tf, tf.float32)
    kwargs = dict(step_size=1.0 / n, max_steps=n + 10, jit_compile=False)
    if mode == "mali":
        kwargs.update(method="alf", gradient="mali")
    elif mode == "aca-budget":
        kwargs.update(gradient=tfaca.ACAGradient(checkpoints=BUDGET))
    else:
        kwargs.update(gradient=mode)

    @tf.function
    def fwdbwd(y0):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            sol = tfaca.solve(f, y0, [0.0, 1.0], **kwargs)
            loss = tf.reduce_sum(tf.square(sol.ys[-1]))
        return sol.stats.num_steps, tape.gradient(loss, [y0] + weights)

    steps, grads = fwdbwd(y0)
    del grads
    tensors, rss, seconds = [], [], []
    for _ in range(MEASURE[mode][1]):
        base = _status_kb("VmRSS")
        if not _reset_hwm():
            raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs)")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        t0 = time.perf_counter()
        _, grads = fwdbwd(y0)
        [g.numpy() for g in grads]
        del grads
        seconds.append(time.perf_counter() - t0)
        tensors.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
        rss.append(_status_kb("VmHWM") - base)
    print(json.dumps(dict(mode=mode, n=n, steps=int(steps), seconds=min(seconds),
                          rss_mb=max(rss) / 1024.0, mem_mb_each=[x / 2**20 for x in tensors])))


def drift(n, dtype_name):
    """Relative error of y0 rebuilt by inverting n ALF steps from the end."""
    import numpy as np
    import tensorflow as tf

    import tfaca

    dtype = getattr(tf, dtype_name)
    field, y0, _ = _field(tf, dtype)
    f = lambda t, y: [field(t, y[0])]  # noqa: E731  (the solver's flat-list form)
    solver = tfaca.ALF()
    h = tf.constant(1.0 / n, dtype)

    @tf.function
    def run():
        def forward(i, y, v):
            y1, v1, _ = solver.step(f, tf.cast(i, dtype) * h, [y], [v], h)
            return i + 1, y1[0], v1[0]

        def backward(i, y, v):
            y1, v1 = solver.inverse(f, tf.cast(i - 1, dtype) * h, [y], [v], h)
            return i - 1, y1[0], v1[0]

        _, y, v = tf.while_loop(lambda i, *_: i < n, forward, (0, y0, field(0.0, y0)))
        _, y, _ = tf.while_loop(lambda i, *_: i > 0, backward, (n, y, v))
        return y

    rebuilt = run().numpy()
    return float(np.max(np.abs(rebuilt - y0.numpy())) / np.max(np.abs(y0.numpy())))


def _cell(r):
    spread = (f" [{r['mem_min_mb']:.1f}-{r['mem_max_mb']:.1f}]"
              if r["mem_max_mb"] - r["mem_min_mb"] >= 0.05 else "")
    return f"{r['mem_mb']:.1f}{spread} ({r['rss_mb']:.1f})"


def measure(mode, n):
    """Runs `mode` at `n` steps in `MEASURE[mode][0]` processes; the median of every
    measured call, with their range."""
    calls = []
    for _ in range(MEASURE[mode][0]):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(n)],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        calls.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _summary(dict(mode=mode, n=n, steps=calls[0]["steps"],
                         seconds=min(c["seconds"] for c in calls),
                         mem_mb_each=[x for c in calls for x in c["mem_mb_each"]],
                         rss_mb=max(c["rss_mb"] for c in calls)))


def _summary(r):
    """An entry with the median and range of its measured calls."""
    each = sorted(r["mem_mb_each"])
    return dict(r, mem_mb=statistics.median(each), mem_min_mb=each[0], mem_max_mb=each[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 steps only")
    ap.add_argument("--out", default=os.path.join(HERE, "mali_memory.md"))
    ap.add_argument("--render-only", action="store_true",
                    help="re-write the report from the saved measurements")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="measure these modes again, keep the others' saved measurements")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]))
        return

    ns = [100, 1000] if a.quick else [100, 1000, 10000]
    saved = os.path.join(HERE, ".cache", "mali_memory.json")
    results = {}
    if a.render_only or a.modes != ",".join(MODES):
        with open(saved) as fh:
            results = {(r["mode"], r["n"]): _summary(r) for r in json.load(fh)}
    if a.render_only:
        ns = sorted({n for _, n in results})
    else:
        for n in ns:
            for mode in a.modes.split(","):
                if mode == "naive" and n > NAIVE_MAX:
                    continue
                results[(mode, n)] = measure(mode, n)
                print(results[(mode, n)], flush=True)
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        with open(saved, "w") as fh:
            json.dump(list(results.values()), fh)

    lines = [
        "# Peak memory against the number of steps (issue 14)",
        "",
        f"Generated {datetime.date.today()} by `python benchmarks/mali_memory.py"
        f"{' --quick' if a.quick else ''}` on a 2-core CPU. The field and the method are "
        "in the script's docstring: a "
        + "x".join(map(str, SHAPE[1:])) + f" float32 state ({STATE_MB * 1024:.0f} KiB), "
        "fixed steps of 1/N, forward+backward in a `tf.function`; budgeted ACA keeps "
        f"K = {BUDGET} checkpoints. Each entry is the median of its measured calls "
        "(processes x calls: " + ", ".join(f"{m} {p}x{c}" for m, (p, c) in MEASURE.items())
        + "), with their range in brackets when they differ.",
        "",
        "Peak tensor memory of the call above the tensors allocated before it, MB "
        "(TensorFlow's BFC allocator statistics; in parentheses, the largest peak "
        "resident memory of the process above its resident memory before the call). "
        "Speed is measured in `benchmarks/mali_speed.md`:",
        "",
        "| mode | " + " | ".join(f"N = {n:,}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for mode in MODES:
        cells = []
        for n in ns:
            r = results.get((mode, n))
            cells.append("not run" if r is None else _cell(r))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"One state is {STATE_MB:.3f} MB. Peak memory in states:")
    lines.append("")
    lines.append("| mode | " + " | ".join(f"N = {n:,}" for n in ns) + " |")
    lines.append("|---|" + "---|" * len(ns))
    for mode in MODES:
        cells = [("-" if (mode, n) not in results else
                  f"{results[(mode, n)]['mem_mb'] / STATE_MB:.0f}") for n in ns]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")

    mali = [results[("mali", n)]["mem_mb"] for n in ns]
    spread = (max(mali) - min(mali)) / min(mali)
    mali_max = [results[("mali", n)]["mem_max_mb"] for n in ns]
    spread_max = (max(mali_max) - min(mali_max)) / min(mali_max)
    states_range = max(results[("mali", n)]["mem_max_mb"] - results[("mali", n)]["mem_min_mb"]
                       for n in ns) / STATE_MB
    budget = [results[("aca-budget", n)]["mem_mb"] / STATE_MB for n in ns]
    # What budgeted ACA holds at most: its min(K, N) kept states twice (the loop's list
    # of them and the one tensor it hands to the backward pass, both alive while it is
    # copied), one rebuilt segment (stride < 2N/K states) and one Dopri5 step's working
    # memory, measured by the adjoint's peak (a Dopri5 solve that keeps no states).
    working = [results[("adjoint", n)]["mem_mb"] / STATE_MB for n in ns]
    bound = [2 * min(BUDGET, n) + 2 * n / BUDGET + w for n, w in zip(ns, working)]
    aca_ns = [n for n in ns if ("aca", n) in results]
    lines += [
        "",
        "## Targets",
        "",
        f"- MALI's memory flat in the number of steps (within 10 % from {ns[0]:,} to "
        f"{ns[-1]:,}): medians {', '.join(f'{m:.2f}' for m in mali)} MB, a spread of "
        f"{100 * spread:.1f} %: **{'met' if spread <= 0.10 else 'missed'}** (largest "
        f"calls {', '.join(f'{m:.2f}' for m in mali_max)} MB, a spread of "
        f"{100 * spread_max:.1f} %). A call's peak varies by up to {states_range:.0f} states "
        "between calls at the same N (the order of independent operations, and which free block "
        "TensorFlow's allocator serves a tensor from); what grows with N is each step's "
        "(t, dt, interval, landing) scalars, 13 bytes per step.",
        f"- Budgeted ACA bounded by its budget: K = {BUDGET} checkpoints kept, and in the "
        "backward pass one segment of at most 2N/K states rebuilt at a time; peak "
        + ", ".join(f"{b:.0f}" for b in budget) + " states against the bound 2 min(K, N) "
        "+ 2N/K + one Dopri5 step's working memory (the adjoint's peak) = "
        + ", ".join(f"{b:.0f}" for b in bound)
        + f": **{'met' if all(x <= y for x, y in zip(budget, bound)) else 'missed'}**; full "
        "ACA: " + ", ".join(f"{results[('aca', n)]['mem_mb'] / STATE_MB:.0f}" for n in aca_ns)
        + " states (2 per step: the same hand-off copy).",
        "",
        "## Drift of ALF's inverse",
        "",
        "The largest error of `y0` rebuilt by inverting the N steps from the end, relative "
        "to the largest `|y0|` (MALI's backward pass raises when it exceeds sqrt(eps): "
        "3.5e-4 in float32, 1.5e-8 in float64):",
        "",
        "| dtype | " + " | ".join(f"N = {n:,}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for dtype in ("float32", "float64"):
        lines.append(f"| {dtype} | " + " | ".join(f"{drift(n, dtype):.1e}" for n in ns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
