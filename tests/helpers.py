"""Shared test problems and reference computations."""

import json
import os
import pathlib
import subprocess

import numpy as np
import scipy.linalg
import tensorflow as tf

ADAPTIVE = ["heun_euler", "bosh3", "dopri5", "tsit5"]
FIXED = ["euler", "midpoint", "rk4"]
ORDERS = {"euler": 1, "midpoint": 2, "rk4": 4, "heun_euler": 2, "bosh3": 3, "dopri5": 5, "tsit5": 5}

# The gradient modes that every output and stepping mode supports.
MODES = ["aca", "adjoint", "naive"]


def strategy(mode):
    """The `gradient=` argument for `mode` (the adjoint as an object, whose
    `backward_stats` a test may read)."""
    import tfaca

    return tfaca.AdjointGradient() if mode == "adjoint" else mode


def f64(x):
    """`x` as a float64 constant."""
    return tf.constant(np.asarray(x), tf.float64)


# A damped rotation: smooth, non-stiff, with a known exponential solution.
A_NP = np.array([[-0.1, 1.0, 0.0], [-1.0, -0.1, 0.2], [0.0, -0.3, -0.5]])


def linear_func(A):
    A = tf.constant(A)
    return lambda t, y: tf.linalg.matvec(A, y)


def expm_solution(A, y0, t):
    return scipy.linalg.expm(A * t) @ y0


def frechet_expm(A, E):
    """Fréchet derivative of expm at A in direction E."""
    return scipy.linalg.expm_frechet(A, E, compute_expm=False)


# ---------------------------------------------------------------------------------------
# Unrolled reference for the ACA gradient.
#
# ACA differentiates the discrete map made of the *accepted* steps with their sizes held
# fixed. The helpers below obtain that step sequence from tfaca's own loop (with the
# checkpoints recorded) and rebuild the map as an ordinary, fully taped TensorFlow
# computation whose gradient is the reference.


class AcceptedSteps:
    """The accepted steps of a forward solve, as NumPy arrays of length `num_steps`."""

    def __init__(self, t, dt, interval, hit, num_steps, num_rejected, ys):
        self.t = t
        self.dt = dt
        self.interval = interval
        self.hit = hit
        self.num_steps = num_steps
        self.num_rejected = num_rejected
        self.ys = ys  # flat list of [len(ts), ...] arrays from the recording solve

    def __len__(self):
        return self.num_steps


def flat_func(func, y0, args=()):
    """`func(t, y, *args)` on a (possibly nested) state, as `f(t, y_flat) -> y_flat`."""

    def f(t, y_flat):
        y = tf.nest.pack_sequence_as(y0, list(y_flat))
        return [tf.convert_to_tensor(o) for o in tf.nest.flatten(func(t, y, *args))]

    return f


def accepted_steps(func, y0, ts, *, args=(), method="dopri5", rtol=1e-3, atol=1e-6,
                   max_steps=1000):
    """Runs tfaca's integration loop with `record=True` and reads its checkpoints.

    Builds the solver, controller and flat function the way `tfaca.solve` does
    (scalar tolerances converted exactly to the state dtype, one per state component).
    """
    import tfaca
    from tfaca import _loop

    y0_flat = [tf.convert_to_tensor(y) for y in tf.nest.flatten(y0)]
    dtype = y0_flat[0].dtype
    ts = tf.cast(tf.convert_to_tensor(ts), dtype)
    solver = tfaca.get_solver(method)
    controller = tfaca.StepSizeController(
        rtol=[tf.constant(rtol, dtype) for _ in y0_flat],
        atol=[tf.constant(atol, dtype) for _ in y0_flat],
    )
    traj = _loop.integrate(
        solver, controller, flat_func(func, y0, args), ts, y0_flat,
        step_size=None, first_step=None, max_steps=max_steps, record=True,
    )
    assert int(traj.status) == 0, f"reference solve failed with status {int(traj.status)}"
    cp = traj.checkpoints
    n = int(cp.num_steps)

    def dense(x):  # checkpoints are tensors or TensorArrays, sized num_steps or max_steps
        x = x.stack() if hasattr(x, "stack") else x
        x = np.asarray(x)[:n]
        # Shared steps are one group: `[size, 1]`.
        return x[:, 0] if x.ndim == 2 and x.shape[1] == 1 else x

    return AcceptedSteps(
        t=dense(cp.t),
        dt=dense(cp.dt),
        interval=dense(cp.interval),
        hit=dense(cp.hit),
        num_steps=n,
        num_rejected=int(traj.stats.num_rejected),
        ys=[y.numpy() for y in traj.ys],
    )


def unrolled_solve(func, y0, ts, steps, *, args=(), method="dopri5"):
    """Rebuilds `y(ts)` from the accepted steps as a plain differentiable computation.

    Within output interval `j` (`[ts[j-1], ts[j]]`), the first step starts at `ts[j-1]`
    (a tensor, so gradients reach it), each non-landing step uses its recorded size as a
    constant, and the step that lands on `ts[j]` uses `dt = ts[j] - t`. Returns the
    outputs with the structure of `y0` and a leading axis of `len(ts)`.
    """
    import tfaca

    solver = tfaca.get_solver(method)
    y0_flat = [tf.convert_to_tensor(y) for y in tf.nest.flatten(y0)]
    f = flat_func(func, y0, args)
    num_out = int(ts.shape[0])
    outputs = [[y] for y in y0_flat]
    y = list(y0_flat)
    t = None
    expected_interval = 1
    for i in range(len(steps)):
        j = int(steps.interval[i])
        assert j == expected_interval, f"step {i} is in interval {j}, expected {expected_interval}"
        if t is None:
            t = ts[j - 1]
        # The rebuilt start time must be the recorded one (same arithmetic, same value).
        np.testing.assert_allclose(float(t), steps.t[i], rtol=1e-14, atol=1e-14)
        if steps.hit[i]:
            dt = ts[j] - t
        else:
            dt = tf.constant(steps.dt[i], ts.dtype)
        y, _, _ = solver.step(f, t, y, f(t, y), dt)
        y = list(y)
        if steps.hit[i]:
            for out, y_n in zip(outputs, y):
                out.append(y_n)
            t = None
            expected_interval += 1
        else:
            t = t + dt
    assert expected_interval == num_out, "the accepted steps do not reach the last output"
    return tf.nest.pack_sequence_as(y0, [tf.stack(out) for out in outputs])


def relative_error(a, b, floor=1e-300):
    """`max |a - b| / max |b|`, the scale at least `floor`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor))


def assert_relative(actual, expected, rtol, names=None, floor=1e-300):
    """Each pair of `actual` and `expected` within `rtol` in `relative_error`."""
    names = names or [str(k) for k in range(len(expected))]
    assert len(actual) == len(expected)
    for name, a, e in zip(names, actual, expected):
        err = relative_error(a, e, floor)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def assert_grads_close(actual, expected, rtol, name=""):
    """Compares nested gradients, each with a tolerance relative to its largest entry."""
    actual = tf.nest.flatten(actual)
    expected = tf.nest.flatten(expected)
    assert len(actual) == len(expected), name
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{name}[{k}]: gradient is None"
        assert e is not None, f"{name}[{k}]: reference gradient is None"
        a = np.asarray(tf.convert_to_tensor(a))
        e = np.asarray(tf.convert_to_tensor(e))
        assert np.all(np.isfinite(a)), f"{name}[{k}]: non-finite gradient {a}"
        scale = max(np.max(np.abs(e)), 1e-300)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=f"{name}[{k}]")


def child_env(tf_config=None):
    """The environment of a test's Python subprocess: this checkout importable, no GPU,
    quiet TensorFlow, and no proxy (workers talk to 127.0.0.1 only); `tf_config` sets
    TF_CONFIG for a multi-worker process."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")
        and k != "TF_CONFIG"
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join(
            [str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def count_xla_compilations(argv, env=None):
    """Runs `argv` (a Python command) in a subprocess and counts the programs XLA compiles
    in it, per call it marks: the command writes a line `@@ LABEL` to stderr (flushed)
    before each call. Returns `(stdout, counts)`, `counts[LABEL]` a list with each marked
    call's number of compilations, in order.

    TensorFlow 2.21: with `TF_CPP_MIN_LOG_LEVEL=0` and
    `TF_CPP_VMODULE=device_compiler=2`, `DeviceCompiler` logs "Instantly compiling for
    signature" each time it compiles a function XLA must compile
    (`tf.function(jit_compile=True)`), and "Already Compiled for signature" when it
    reuses one (`tensorflow/compiler/jit/device_compiler.h`). Its log and the marks share
    stderr, so they arrive in order. (XLA's persistent cache,
    `TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`, also shows compilations, as
    files, but names them by the program's fingerprint and loads a program it has seen
    instead of compiling it: the log is the direct count.)
    """
    env = dict(child_env() if env is None else env)
    env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="device_compiler=2")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{argv} failed: {proc.stderr[-3000:]}")
    counts, label = {}, None
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            label = line[3:].strip()
            counts.setdefault(label, []).append(0)
        elif label is not None and "Instantly compiling for signature" in line:
            counts[label][-1] += 1
    return proc.stdout, counts


def resident_bytes():
    """The process's resident set size (VmRSS): TensorFlow's C++ allocations included,
    which `tracemalloc` misses."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
