"""Shared test problems and reference computations."""

import json
import os
import pathlib
import subprocess

import keras
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


F64 = tf.float64
Y0_NP = np.array([1.0, 0.5, -0.3])


def random_y0(batch=None, dtype=F64):
    """A seeded random state of 3 components (one per sample with `batch`)."""
    rng = np.random.default_rng(1)
    shape = (3,) if batch is None else (batch, 3)
    return tf.constant(rng.standard_normal(shape), dtype)


def random_per_sample_ts(batch=4, n=6, t1=3.0, seed=0, pad_row=2):
    """Increasing output times per sample from 0, row `pad_row` padded after 4 times (a
    sample with fewer observations)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.uniform(0.0, t1, (batch, n)), axis=1)
    ts[:, 0] = 0.0
    if pad_row is not None:
        ts[pad_row, 4:] = ts[pad_row, 3]
    return ts


def linear_exact(y0, ts):
    """expm solution of y' = A_NP y at each time: `[n, ...]`, per sample when ts is 2-D."""
    y0 = np.asarray(y0)
    ts = np.asarray(ts)
    if ts.ndim == 1:
        return np.stack([expm_solution(A_NP, y0.T, t - ts[0]).T for t in ts])
    return np.stack(
        [[expm_solution(A_NP, y0[b], t - ts[b, 0]) for b, t in enumerate(col)] for col in ts.T]
    )


def variable_linear_problem():
    """`(A, func)`: y' = A y * scale + c sin(t) with A a variable and `scale` an arg."""
    A = tf.Variable(A_NP, name="A")
    c = tf.constant([0.3, -0.2, 0.1], F64)

    def func(t, y, scale):
        return tf.linalg.matvec(A, y) * scale + c * tf.sin(t)

    return A, func


def projection_loss(ys, seed=3):
    """A fixed random projection of the squares of every output (each output matters)."""
    flat = tf.nest.flatten(ys)
    rng = np.random.default_rng(seed)
    return tf.add_n([tf.reduce_sum(tf.constant(rng.standard_normal(y.shape), y.dtype) * y ** 2)
                     for y in flat])


def van_der_pol(t, y, mu=1.0):
    """Van der Pol's oscillator, the state's last axis `(x, v)`."""
    x, v = y[..., 0], y[..., 1]
    return tf.stack([v, mu * (1.0 - x ** 2) * v - x], axis=-1)


def tanh_field(t, y, W):
    """y' = tanh(W y) - 0.1 y."""
    return tf.tanh(tf.linalg.matvec(W, y)) - 0.1 * y


SHORT_TS = np.array([0.0, 0.6, 1.3])


def hvp(loss_fn, x, v):
    """The Hessian of `loss_fn` at `x` times `v`, by two nested tapes."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = loss_fn(x)
        g = inner.gradient(loss, x)
    return outer.gradient(g, x, output_gradients=v)


# A non-autonomous nonlinear problem with weights and a loss that weighs every output.
# Loose tolerances per method: every method takes a handful of steps on it and rejects at
# least one trial (asserted in `test_aca.test_unrolled_y0`).
LOOSE_TOL = {"heun_euler": 1e-3, "bosh3": 1e-4, "dopri5": 1e-6, "tsit5": 1e-6}
TANH_W = np.random.default_rng(0).normal(size=(3, 3)) * 2.0
TANH_B = np.array([0.3, -0.2, 0.1])
TANH_TS = np.array([0.0, 0.7, 1.5, 3.0])
_TANH_RNG = np.random.default_rng(1234)
# Generic cotangents for every output (ys[0] included): a linear and a quadratic term.
TANH_C = _TANH_RNG.normal(size=(len(TANH_TS), 3))
TANH_Q = _TANH_RNG.uniform(0.5, 1.5, size=(len(TANH_TS),))


def tanh_rhs(t, y, W, b):
    """tanh(W y) + b cos(3 t)."""
    return tf.tanh(tf.linalg.matvec(W, y)) + b * tf.cos(3.0 * t)


def quadratic_loss(ys):
    """Weighted sum of squares plus a linear term, over all outputs."""
    ys = tf.convert_to_tensor(ys)
    n = ys.shape[0]
    c = tf.constant(TANH_C[:n, : ys.shape[1]], ys.dtype)
    q = tf.constant(TANH_Q[:n], ys.dtype)
    return tf.reduce_sum(c * ys) + 0.5 * tf.reduce_sum(q[:, None] * tf.square(ys))


# A time-dependent MLP field on a batch of 3, solved with every option a test varies:
# `mlp_gradients` returns its outputs and the gradients of every input (GRADIENT_NAMES).
_MLP_RNG = np.random.default_rng(26)
MLP_W = _MLP_RNG.normal(size=(4, 4)) * 0.5
MLP_B = _MLP_RNG.normal(size=(4,))
MLP_Y0 = _MLP_RNG.normal(size=(3, 4))
MLP_TIMES = {
    "shared": [0.0, 0.1, 0.35, 0.7, 1.0, 1.3],
    "decreasing": [1.3, 1.0, 0.7, 0.35, 0.1, 0.0],
    "rows": [[0.0, 0.4, 0.9, 1.3], [0.0, 0.2, 1.1, 1.1], [0.0, 0.5, 0.7, 1.0]],
}
GRADIENT_NAMES = ["ys", "y0", "ts", "W", "b"]


def mlp_gradients(gradient, ts, *, method="dopri5", per_sample=False, step_size=None,
                  interpolate=True, rtol=1e-6, jit_compile="auto"):
    """Outputs and dL/d(y0, ts, W, b) of a float64 solve of the MLP field."""
    w, b = tf.Variable(MLP_W), tf.Variable(MLP_B)

    def func(t, y):
        t = tf.convert_to_tensor(t)
        scale = 1.0 + 0.1 * (t if t.shape.rank == 0 else t[:, None])
        return tf.tanh(y @ w + b) * scale - 0.1 * y

    import tfaca

    y0 = tf.constant(MLP_Y0)
    ts = tf.constant(ts, tf.float64)
    n = ts.shape[-1]
    c = tf.constant(np.sin(np.arange(n * 12) * 1.7).reshape(n, 3, 4))
    with tf.GradientTape() as tape:
        tape.watch([y0, ts])
        sol = tfaca.solve(func, y0, ts, method=method, gradient=gradient, rtol=rtol, atol=1e-8,
                          step_size=step_size, per_sample=per_sample, interpolate=interpolate,
                          max_steps=5000, jit_compile=jit_compile)
        loss = tf.reduce_sum(c * sol.ys)
    grads = tape.gradient(loss, [y0, ts, w, b])
    return [sol.ys.numpy()] + [g.numpy() for g in grads]


class NestedField:
    """A small nonlinear field with weights and a nested state `(p, q)` of a batch."""

    def __init__(self, dtype=tf.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.W = tf.Variable(rng.normal(size=(5, 5)) * 0.5, dtype=dtype)
        self.b = tf.Variable(rng.normal(size=(5,)) * 0.1, dtype=dtype)

    def __call__(self, t, y):
        p, q = y
        x = tf.concat([p, q], axis=-1)
        out = tf.tanh(tf.linalg.matvec(self.W, x) + self.b) * (1.0 + 0.1 * tf.sin(t))
        return out[:, :2], out[:, 2:]


def nested_y0(dtype=tf.float64, seed=1):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(3, 2)), dtype), tf.constant(rng.normal(size=(3, 3)), dtype))


NESTED_TS = [0.0, 0.6, 1.3, 2.0]


def weighted_loss(ys):
    """A loss that weighs every output time differently."""
    weights = tf.range(1, ys[0].shape[0] + 1, dtype=ys[0].dtype)
    return sum(tf.reduce_sum(tf.reshape(weights, [-1, 1, 1]) * tf.square(y)) for y in ys)


def field_gradients(field, y0, ts, mode="eager", **kwargs):
    """The number of steps and the gradients of `weighted_loss` with respect to y0, ts and
    the field's weights, eagerly, in a `tf.function` ("function") or under XLA ("xla")."""
    import tfaca

    y0_vars = [tf.Variable(y) for y in y0]
    ts_var = tf.Variable(tf.constant(ts, y0[0].dtype))

    def run():
        with tf.GradientTape() as tape:
            sol = tfaca.solve(field, tuple(y0_vars), ts_var, interpolate=False, **kwargs)
            loss = weighted_loss(sol.ys)
        grads = tape.gradient(loss, [*y0_vars, ts_var, field.W, field.b])
        return sol.stats.num_steps, grads

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    num_steps, grads = run()
    return int(num_steps), [g.numpy() for g in grads]


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

    y0_flat = [tf.convert_to_tensor(y) for y in tf.nest.flatten(y0)]
    ts = tf.cast(tf.convert_to_tensor(ts), y0_flat[0].dtype)
    traj = recorded_trajectory(tfaca.get_solver(method), flat_func(func, y0, args), ts,
                               y0_flat, rtol, atol, states=None, max_steps=max_steps)
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


def recorded_trajectory(solver, func, ts, y0, rtol, atol=None, *, states=0, max_steps=5000):
    """tfaca's loop run with `record=True` on `func(t, y_list)` from the flat state `y0`
    (`atol` = `rtol` unless given; scalar tolerances converted exactly to the state dtype,
    one per component, as `tfaca.solve` does): the trajectory, its `checkpoints` those ACA
    replays. `states` as the loop's: 0 keeps no start state, None every one, K a budget
    of K."""
    import tfaca
    from tfaca import _loop

    y0 = list(y0)
    dtype = y0[0].dtype
    atol = rtol if atol is None else atol
    controller = tfaca.StepSizeController(rtol=[tf.constant(rtol, dtype)] * len(y0),
                                          atol=[tf.constant(atol, dtype)] * len(y0))
    ts = tf.cast(ts, dtype) if tf.is_tensor(ts) else tf.constant(ts, dtype)
    return _loop.integrate(
        solver, controller, func, ts, y0, step_size=None, first_step=None,
        max_steps=max_steps, record=True, states=states)


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


def accepted_dense_steps(func, y0, t0, t1, method, rtol, atol, args=()):
    """The starts and sizes of the accepted steps from t0 to t1 (what interpolation steps
    onto)."""
    steps = accepted_steps(func, y0, [t0, t1], args=args, method=method, rtol=rtol,
                           atol=atol, max_steps=10000)
    return steps.t, steps.dt


def unrolled_dense(func, y0, ts, starts, sizes, method, args=()):
    """`y(ts)` rebuilt from the accepted steps as a plain taped computation, written
    independently of tfaca's loop and of `_outputs`: each output time is found among the
    steps with NumPy, and its value is `y_i + dt_i sum_s b_s(theta) k_s` with the
    solver's weights evaluated per stage in Python.

    Step starts are `ts[0] + fixed offset`; the last step ends on `ts[-1]`."""
    import tfaca

    solver = tfaca.get_solver(method)
    f = flat_func(func, y0, args)
    weights = np.array(solver.dense_weights)  # [stages, degree]
    y = [tf.convert_to_tensor(v) for v in tf.nest.flatten(y0)]
    n_steps = len(starts)
    t_start, t_end = ts[0], ts[-1]
    states, stage_lists, step_t, step_dt = [], [], [], []
    for i in range(n_steps):
        t = t_start + (starts[i] - float(starts[0])) if i else t_start
        dt = t_end - t if i == n_steps - 1 else tf.constant(sizes[i], ts.dtype)
        y1, _, _, k = solver.step(f, t, y, f(t, y), dt, return_stages=True)
        if solver.dense_needs_f1:
            k = k + [f(t + dt, y1)]
        states.append(y)
        stage_lists.append(k)
        step_t.append(t)
        step_dt.append(dt)
        y = list(y1)
    outputs = [[v] for v in tf.nest.flatten(y0)]
    for m in range(1, int(ts.shape[0])):
        tm = float(ts[m])
        sign = 1.0 if float(ts[-1]) > float(ts[0]) else -1.0
        i = int(np.searchsorted(sign * np.asarray(starts), sign * tm, side="right")) - 1
        if m == int(ts.shape[0]) - 1:
            value = y  # the end of the solve
        else:
            theta = (ts[m] - step_t[i]) / step_dt[i]
            b = [sum(w * theta ** (p + 1) for p, w in enumerate(row)) for row in weights]
            value = [
                y_n + step_dt[i] * tf.add_n([b_s * k_s[c] for b_s, k_s in zip(b, stage_lists[i])])
                for c, y_n in enumerate(states[i])
            ]
        for out, v in zip(outputs, value):
            out.append(v)
    return tf.nest.pack_sequence_as(y0, [tf.stack(out) for out in outputs])


# How far float64 results of one solve compiled two ways (XLA against TensorFlow's own
# kernels) may differ, relative to the array's largest entry: XLA fuses and contracts
# (FMA) the arithmetic its own way, a few ulps per operation over hundreds of steps.
# Seen: under 1e-12 on CPUs, 1.9e-11 on an H100.
COMPILED_RTOL = 1e-10


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


# ---------------------------------------------------------------------------------------
# Keras building blocks.

STATE = 4
HIDDEN = 16
BATCH = 16
SMALL_BATCH = 8
IRREGULAR = np.array([0.0, 0.13, 0.5, 0.52, 1.7], "float32")  # irregular output times


def mlp_dynamics(state=STATE, hidden=HIDDEN, name=None, **dense_kwargs):
    """Dense(hidden, tanh) -> Dense(state), `dense_kwargs` for the first Dense."""
    return keras.Sequential(
        [keras.layers.Dense(hidden, activation="tanh", **dense_kwargs), keras.layers.Dense(state)],
        name=name,
    )


def float64_mlp(dim):
    """A float64 Keras MLP `dim -> 16 -> dim`, built."""
    return keras.Sequential(
        [
            keras.Input((dim,), dtype="float64"),
            keras.layers.Dense(16, activation="tanh", dtype="float64"),
            keras.layers.Dense(dim, dtype="float64"),
        ]
    )


def states(n=SMALL_BATCH, seed=0):
    """A seeded float32 batch of `n` states."""
    return tf.constant(np.random.default_rng(seed).normal(size=(n, STATE)).astype("float32"))


def regression_data(n=64, state=STATE, seed=0):
    """Inputs `(n, state)` and a smooth target `(n, 1)`, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, state)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def odeint_dynamics(dynamics, y0, ts, **kwargs):
    """The reference: `tfaca.odeint` on `dy/dt = dynamics(y)` (inference mode)."""
    import tfaca

    return tfaca.odeint(lambda t, y: dynamics(y), y0, ts, **kwargs)


def traced_under_xla():
    """Whether ops built now will be compiled by XLA (TensorFlow's own test, from its
    control-flow utilities: there is no public one)."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


class TrainingRecorder(keras.layers.Layer):
    """A Dense layer that records the `training` flag and the dtype of `y` it receives,
    and whether it was traced under XLA (`.flags`, `.dtypes`, `.xla`)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, activation="tanh")
        self.flags = []
        self.dtypes = []
        self.xla = []

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, y, training=None):
        self.flags.append(training)
        self.dtypes.append(tf.as_dtype(y.dtype))
        self.xla.append(traced_under_xla())
        return self.dense(y)


def observed_series(batch, n, channels, seed, span):
    """A batch of series for the path and control tests: `n` sorted observation times on
    `[0, span)` starting at 0, and values `(batch, n, channels)`."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, span, n))
    t[0] = 0.0
    return t, rng.normal(size=(batch, n, channels))
