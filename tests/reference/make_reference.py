"""Writes tests/reference/today.npz: tfaca's outputs, gradients and step statistics for a
matrix of configurations, computed with the tfaca this script imports, for
tests/test_regression.py to check later versions against (issue 26: a rewrite of the
integration loop and of the gradients' replays must reproduce them to 1e-12 in float64).

Run it only when a numerical change is intended, from the repository root:

    python tests/reference/make_reference.py            # writes tests/reference/today.npz
    python tests/reference/make_reference.py --only t6-dense-shared-aca-dopri5-eager

It refuses to write when `tfaca/` has uncommitted changes (the file records the commit it
was made from), unless `--allow-dirty` is given.

The problem (float64): `y' = tanh(y @ W + b) * (1 + 0.1 t) - 0.1 y`, `W` (4x4) and `b`
(4,) `tf.Variable`s, `y0` of shape (3, 4) (a batch of 3), `t` reshaped to `[-1, 1]` so
that the per-sample time (`[batch]`) broadcasts. Loss `L = sum(c[:n] * ys)` with a fixed
random `c` (non-uniform cotangents). Recorded per configuration: `ys`, `dL/dy0`,
`dL/dts`, `dL/dW`, `dL/db` (y0 and ts watched by the tape), `Solution.stats`, `status`,
`t_final`, and for the adjoint its reverse solve's `backward_stats` where they exist.

Configurations tfaca refuses (ValueError) are listed as `skipped` in the metadata, those
it accepts but fails to solve (SolveError) as `failed`; neither records any array.
This module is also imported by tests/test_regression.py, which reruns each recorded
configuration with `run()` on the inputs read from the .npz.
"""

import os

# As tests/conftest.py: XLA without LLVM's optimizations, so the reference is computed
# the way the tests recompute it.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfaca  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "today.npz"

DTYPE = tf.float64
RTOL, ATOL = 1e-6, 1e-8
MAX_STEPS = 1000

STATS = ("num_steps", "num_rejected", "num_fevals", "num_fevals_backward")
GRADS = ("g_y0", "g_ts", "g_W", "g_b")


# ---------------------------------------------------------------------------------------
# The problem.


def make_inputs():
    """The problem's data, as NumPy arrays (stored in the .npz under `input/`)."""
    rng = np.random.RandomState(2026)
    return {
        "W": rng.randn(4, 4) * 0.6,
        "b": rng.randn(4) * 0.3,
        "y0": rng.randn(3, 4),
        "c": rng.randn(6, 3, 4),
        # Shared times: 2; 6 increasing and non-uniform; 6 decreasing.
        "ts_t2": np.array([0.0, 1.3]),
        "ts_t6": np.array([0.0, 0.15, 0.4, 0.45, 0.9, 1.3]),
        "ts_t6dec": np.array([1.3, 1.05, 0.8, 0.75, 0.3, 0.0]),
        # Times per sample: every row starts at 0, different last times, row 1 padded.
        "ts_rows": np.array([[0.0, 0.4, 0.9, 1.3], [0.0, 0.2, 1.1, 1.1], [0.0, 0.5, 0.7, 1.0]]),
    }


def make_field(W, b):
    def field(t, y):
        t = tf.reshape(tf.cast(t, y.dtype), [-1, 1])  # scalar, or [batch] per sample
        return tf.tanh(tf.matmul(y, W) + b) * (1.0 + 0.1 * t) - 0.1 * y

    return field


# ---------------------------------------------------------------------------------------
# Configurations.

# How the solve runs:
#   eager          eagerly (jit_compile="auto": the loops run eagerly)
#   eager_jit      eagerly, solve(jit_compile=True): the loops compiled with XLA
#   function       in a tf.function, jit_compile="auto" (ACA and adjoint loops compiled)
#   function_nojit in a tf.function, solve(jit_compile=False): plain graph loops
#   function_jit   in a tf.function, solve(jit_compile=True) (naive's loop compiled too)
#   xla            in a tf.function(jit_compile=True): the whole computation compiled
MODES = ("eager", "eager_jit", "function", "function_nojit", "function_jit", "xla")
SOLVE_JIT = {"eager": "auto", "eager_jit": True, "function": "auto",
             "function_nojit": False, "function_jit": True, "xla": "auto"}
# gradient spec -> what is passed to solve (aca_k2: tfaca.ACAGradient(checkpoints=2)).
GRADIENTS = ("aca", "naive", "adjoint", "aca_k2", "mali")


def key_of(spec):
    return "-".join([
        spec["times"], "dense" if spec["interpolate"] else "land",
        "ps" if spec["per_sample"] else "shared", spec["gradient"], spec["method"],
        *([f"h{spec['step_size']}"] if spec["step_size"] is not None else []), spec["mode"],
    ])


def spec_of(times, interpolate, per_sample, gradient, method="dopri5", mode="eager",
            step_size=None):
    if gradient == "mali":
        method = "alf"
    return dict(times=times, interpolate=interpolate, per_sample=per_sample,
                gradient=gradient, method=method, mode=mode, step_size=step_size)


def configurations():
    """Every configuration tried, in order (tfaca may refuse some: they are skipped)."""
    specs = []
    # A. The core matrix, eagerly with Dopri5 (Alf for MALI).
    for times in ("t2", "t6", "t6dec", "rows"):
        for interpolate in (True, False):
            for per_sample in (False, True):
                for gradient in GRADIENTS:
                    specs.append(spec_of(times, interpolate, per_sample, gradient))
    # B. Other solvers, eagerly.
    specs += [
        spec_of("t6", True, False, "aca", "rk4", step_size=0.1),
        spec_of("t6", False, True, "aca", "rk4", step_size=0.1),
        spec_of("rows", True, True, "aca", "rk4", step_size=0.1),
        spec_of("t6", True, False, "naive", "rk4", step_size=0.1),
        spec_of("t6", True, False, "aca", "bosh3"),
        spec_of("t6", False, False, "aca", "bosh3"),
        spec_of("rows", True, True, "aca", "bosh3"),
        spec_of("t6dec", True, True, "aca", "bosh3"),
        spec_of("t6", True, False, "adjoint", "bosh3"),
        spec_of("t6", True, False, "aca", "tsit5"),
        spec_of("t6", True, True, "aca", "tsit5"),
        spec_of("t6dec", False, True, "aca", "tsit5"),
        spec_of("rows", True, False, "aca", "tsit5"),
        spec_of("rows", True, True, "naive", "tsit5"),
        spec_of("t6", False, False, "naive", "alf"),
        spec_of("t6", True, False, "naive", "alf"),
        # Fails (the adjoint's reverse solve with ALF: NONFINITE at 30fce51, max_steps
        # at 19531ba), kept to document it in the metadata's `failed`.
        spec_of("t6", True, False, "adjoint", "alf"),
    ]
    # C. Execution modes.
    for mode in MODES[1:]:
        for times, interpolate, per_sample in [
                ("t6", True, False), ("t6", False, False), ("t6", True, True),
                ("t6", False, True), ("rows", True, False), ("rows", True, True)]:
            specs.append(spec_of(times, interpolate, per_sample, "aca", mode=mode))
        for gradient in ("naive", "adjoint"):
            specs.append(spec_of("t6", True, False, gradient, mode=mode))
            specs.append(spec_of("rows", True, True, gradient, mode=mode))
        specs.append(spec_of("t6", False, False, "aca_k2", mode=mode))
        specs.append(spec_of("t2", True, False, "aca_k2", mode=mode))
        specs.append(spec_of("t6", False, False, "mali", mode=mode))
    keys = [key_of(s) for s in specs]
    assert len(set(keys)) == len(keys), "duplicate configuration keys"
    return specs


# ---------------------------------------------------------------------------------------
# One configuration.


def run(spec, inputs):
    """Solves one configuration; returns a dict of NumPy arrays (`ys`, the gradients that
    are not None, `stats/...`, `status`, `t_final`, `backward_stats/...` for an adjoint whose
    counters exist). Raises ValueError where tfaca refuses the configuration."""
    W = tf.Variable(inputs["W"], dtype=DTYPE, name="W")
    b = tf.Variable(inputs["b"], dtype=DTYPE, name="b")
    y0 = tf.constant(inputs["y0"], DTYPE)
    ts = tf.constant(inputs["ts_" + spec["times"]], DTYPE)
    c = tf.constant(inputs["c"], DTYPE)
    field = make_field(W, b)
    # Strategy objects made outside any function, so the adjoint's counters exist.
    gradient = {"aca_k2": lambda: tfaca.ACAGradient(checkpoints=2),
                "adjoint": lambda: tfaca.AdjointGradient()}.get(
                    spec["gradient"], lambda: spec["gradient"])()
    mode = spec["mode"]

    def compute(y0, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts])
            sol = tfaca.solve(
                field, y0, ts, method=spec["method"], rtol=RTOL, atol=ATOL,
                gradient=gradient, step_size=spec["step_size"], max_steps=MAX_STEPS,
                interpolate=spec["interpolate"], per_sample=spec["per_sample"],
                jit_compile=SOLVE_JIT[mode])
            n = ts.shape[-1]
            loss = tf.reduce_sum(c[:n] * sol.ys)
        grads = tape.gradient(loss, [y0, ts, W, b])
        return sol.ys, grads, sol.stats, sol.status, sol.t_final

    if mode.startswith("function"):
        compute = tf.function(compute)
    elif mode == "xla":
        compute = tf.function(compute, jit_compile=True)
    ys, grads, stats, status, t_final = compute(y0, ts)

    out = {"ys": ys.numpy(), "status": np.asarray(status), "t_final": np.asarray(t_final)}
    for name, g in zip(GRADS, grads):
        if g is not None:
            out[name] = np.asarray(tf.convert_to_tensor(g))
    for name in STATS:
        out["stats/" + name] = np.asarray(getattr(stats, name))
    backward = getattr(gradient, "backward_stats", None)
    if backward is not None:
        for name in STATS:
            out["backward_stats/" + name] = np.asarray(getattr(backward, name).numpy())
    return out


# ---------------------------------------------------------------------------------------
# The file.


def _message(e):
    """An exception's message on one line; an error raised while tracing a tf.function
    ("in user code: ... ValueError: ...") by its last line, the error itself."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0] == "in user code:":
        return lines[-1]
    return " ".join(lines)


def _git(*args):
    root = pathlib.Path(tfaca.__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def load(path=DEFAULT_OUT):
    """`(meta, inputs, records)`: the metadata dict, the problem's inputs, and per
    configuration key the dict of recorded arrays."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        inputs = {k[len("input/"):]: data[k] for k in data.files if k.startswith("input/")}
        records = {}
        for k in data.files:
            if "::" in k:
                config, name = k.split("::", 1)
                records.setdefault(config, {})[name] = data[k]
    return meta, inputs, records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", help="configuration keys to compute (a subset)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write even if tfaca/ has uncommitted changes")
    args = parser.parse_args(argv)

    dirty = _git("status", "--porcelain", "--", "tfaca")
    if dirty and not args.allow_dirty:
        sys.exit(f"tfaca/ has uncommitted changes; commit them or pass --allow-dirty:\n{dirty}")
    inputs = make_inputs()
    arrays = {"input/" + k: v for k, v in inputs.items()}
    configs, skipped, failed = {}, {}, {}
    start = time.perf_counter()
    for spec in configurations():
        key = key_of(spec)
        if args.only and key not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            record = run(spec, inputs)
        except ValueError as e:  # refused by tfaca: nothing to record
            skipped[key] = dict(spec=spec, error=_message(e))
            print(f"skipped  {key}: {skipped[key]['error'][:150]}", flush=True)
            continue
        except (tfaca.SolveError, tf.errors.InvalidArgumentError) as e:  # accepted, failed
            failed[key] = dict(spec=spec, error=f"{type(e).__name__}: {_message(e)}")
            print(f"FAILED   {key}: {failed[key]['error'][-160:]}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        configs[key] = dict(spec=spec, seconds=round(seconds, 2))
        for name, value in record.items():
            arrays[f"{key}::{name}"] = value
        steps = record["stats/num_steps"]
        print(f"recorded {key}  ({seconds:.1f} s, num_steps {steps.tolist()})", flush=True)

    meta = dict(
        description=("tfaca reference outputs, gradients and stats; see "
                     "tests/reference/make_reference.py"),
        commit=_git("rev-parse", "HEAD"),
        commit_short=_git("rev-parse", "--short", "HEAD"),
        commit_subject=_git("log", "-1", "--format=%s"),
        tfaca_dirty=bool(dirty),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tensorflow=tf.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        dtype="float64", rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS,
        field="tanh(y @ W + b) * (1 + 0.1 t) - 0.1 y",
        loss="sum(c[:len(ts)] * ys)",
        configs=configs,
        skipped=skipped,
        failed=failed,
    )
    arrays["__meta__"] = np.array(json.dumps(meta, indent=1))
    np.savez_compressed(args.out, **arrays)
    print(f"\n{len(configs)} configurations recorded, {len(skipped)} skipped, "
          f"{len(failed)} failed, {time.perf_counter() - start:.0f} s; wrote {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} KiB) from commit {meta['commit_short']}")


if __name__ == "__main__":
    main()
