"""Reliability: properties over random problems, crashes during training, concurrent
serving and long runs.

1. Properties (hypothesis): on random stable linear systems `y' = A y` with random
   nested states and random output times, `tfaca.odeint` and its ACA gradients agree
   with the matrix exponential and its Fréchet derivative.
2. Faults: `model.fit` killed with SIGKILL mid-epoch and restarted with
   `keras.callbacks.BackupAndRestore` ends with exactly the weights of the run it stands
   for (every run in its own process: `tests/fit_worker.py`).
3. Load: a SavedModel of an `ODELayer` model served from 8 threads at once gives bitwise
   the outputs of serial calls.
4. Load: 1,000 solves with gradients, and 1,000 Keras `predict_on_batch` (and, marked
   slow, `train_on_batch`) calls, neither retrace nor grow the process's memory.
"""

import concurrent.futures
import json
import pathlib
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf
import threadpoolctl
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fit_worker
from helpers import child_env, resident_bytes
import tfaca

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# --------------------------------------------------------------------------------------
# 1. Properties: random linear systems against the matrix exponential
# --------------------------------------------------------------------------------------
#
# Comparison tolerances. dopri5 keeps each accepted step's *estimated* local error below
# `atol + rtol * |y|` (RMS norm). The global error is the sum of the local errors carried
# to the output by the propagator. Forward in time the symmetric part of A is negative
# definite, so ||expm(A t)||_2 <= 1: nothing is amplified and the global error is at most
# (number of steps) x (local tolerance); these solves take at most ~60 steps. Backward
# in time the propagator amplifies by up to exp(2 |span|) (see `_stable_matrix`), but it
# amplifies the solution as much, so the bound holds relative to the largest |y| along
# the way. The estimate is that of the embedded 4th-order solution while the 5th-order
# one is propagated, so actual errors are far smaller: over 2,000 random draws (with
# this module's distributions) at most 1.5 local tolerances forward and 8 for the
# gradients. FACTOR = 100 is the steps bound: it fails on a real error (a wrong
# gradient is off by O(1), a wrong structure or time by far more than 1e-6), never on an
# unlucky draw.
#
# ACA differentiates the discrete map of the accepted steps. For a linear system that map
# is a product of the steps' stability polynomials R(dt A), which approximate expm(dt A)
# to the solver's order as analytic functions of A: their derivatives (the gradients with
# respect to y0 and A) are as accurate, relative to their size, as the propagator, i.e.
# relative error (rtol + atol / max|y|) per step. The gradient sums one term per output
# time, and terms of opposite signs can cancel, so the scale of each gradient's error is
# the sum of its terms' sizes, not the size of the sum.
RTOL, ATOL = 1e-8, 1e-10
FACTOR = 100


def _stable_matrix(m, k, c):
    """A with every eigenvalue's real part <= -c: symmetric part -(D + c I) with D >= 0."""
    n = m.shape[0]
    d = m @ m.T
    d /= max(1.0, np.linalg.norm(d, 2))  # spectrum of D in [0, 1]: backward growth <= e^(2 span)
    return -d - c * np.eye(n) + (k - k.T) / n  # skew part: oscillation, |omega| <= 2


_UNIT = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def linear_problems(draw, nested):
    """A stable A (n = 1..6), y0, 2..6 strictly monotone times spanning up to 3 units
    (increasing or decreasing, from a random start), loss weights and, if `nested`, a
    structure for the state: one tensor, a tuple or a dict of 1..3 components that
    partition the state vector into consecutive slices, each a vector, a row or a
    column."""
    n = draw(st.integers(1, 6))
    m = draw(hnp.arrays(np.float64, (n, n), elements=_UNIT))
    k = draw(hnp.arrays(np.float64, (n, n), elements=_UNIT))
    c = draw(st.floats(0.1, 1.0))
    y0 = draw(hnp.arrays(np.float64, (n,), elements=_UNIT))
    # A state of (nearly) zero gives the controller nothing to measure: every error
    # estimate is ~0, so the steps only grow and the discrete map stops approximating
    # the flow. ACA's gradient is as accurate as the steps chosen for y(t), no more.
    assume(np.max(np.abs(y0)) >= 0.1)
    increments = draw(st.lists(st.floats(0.05, 0.6), min_size=1, max_size=5))
    direction = draw(st.sampled_from([1.0, -1.0]))
    ts = draw(st.floats(-1.0, 1.0)) + direction * np.concatenate([[0.0], np.cumsum(increments)])
    kind = draw(st.sampled_from(["tensor", "tuple", "dict"])) if nested else "vector"
    cuts = []
    if kind in ("tuple", "dict") and n > 1:
        # At most 3 components: eager solves cost time per component and per step.
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), unique=True, max_size=2)))
    bounds = list(zip([0] + cuts, cuts + [n]))
    shapes = [(b - a,) for a, b in bounds]
    if nested:
        shapes = [draw(st.sampled_from([(s,), (1, s), (s, 1)])) for (s,) in shapes]
    # Dict keys in another order than the slices', so tf.nest's sorted order differs.
    keys = list(draw(st.permutations("abcdef"[: len(bounds)]))) if kind == "dict" else None
    return {
        "A": _stable_matrix(m, k, c),
        "y0": y0,
        "ts": ts,
        "weights": draw(hnp.arrays(np.float64, (len(ts), n), elements=_UNIT)),
        "layout": Layout(kind, bounds, shapes, keys),
    }


class Layout:
    """A nested structure for a state vector: `pack` and `unpack` map between them."""

    def __init__(self, kind, bounds, shapes, keys):
        self.kind, self.bounds, self.shapes, self.keys = kind, bounds, shapes, keys

    def pack(self, vector, lead=()):
        """`vector[..., n]` as the structure; `lead` is the shape of its leading axes."""
        parts = [
            tf.reshape(vector[..., a:b], tuple(lead) + shape)
            for (a, b), shape in zip(self.bounds, self.shapes)
        ]
        if self.kind in ("vector", "tensor"):
            return parts[0]
        if self.kind == "tuple":
            return tuple(parts)
        return dict(zip(self.keys, parts))

    def unpack(self, structure, lead=()):
        """The structure as `vector[..., n]`, its components concatenated in slice order."""
        if self.kind in ("vector", "tensor"):
            parts = [structure]
        elif self.kind == "tuple":
            parts = list(structure)
        else:
            parts = [structure[key] for key in self.keys]
        return tf.concat([tf.reshape(p, tuple(lead) + (-1,)) for p in parts], axis=-1)

    def __repr__(self):
        return f"Layout({self.kind!r}, {self.bounds}, {self.shapes}, {self.keys})"


def _loss(weights, ys):
    """L = sum(w * ys) + sum(ys**2) / 2 over every output; ys[0] = y0 included."""
    return tf.reduce_sum(weights * ys) + 0.5 * tf.reduce_sum(ys**2)


# OpenBLAS's threads, spinning for work on a 2-core machine that TensorFlow's threads
# keep busy, make scipy's expm of a 6 x 6 matrix take ~10 ms instead of 0.1 ms.
_BLAS = threadpoolctl.ThreadpoolController()


def _reference(problem):
    """States and the loss's gradients from expm and its Fréchet derivative, with the
    scale of each gradient: the sum of its per-output terms' largest entries."""
    with _BLAS.limit(limits=1, user_api="blas"):
        return _reference_terms(problem)


def _reference_terms(problem):
    A, y0, ts = problem["A"], problem["y0"], problem["ts"]
    taus = ts - ts[0]
    propagators = [scipy.linalg.expm(A * tau) for tau in taus]
    ys = np.stack([p @ y0 for p in propagators])
    g = problem["weights"] + ys  # dL/dy(t_j)
    terms_y0 = [p.T @ g_j for p, g_j in zip(propagators, g)]
    # d/dA of g_j . expm(tau A) y0 = tau L(tau A^T, g_j y0^T): the adjoint of the
    # Fréchet derivative L(X, .) is L(X^T, .).
    terms_a = [
        tau * scipy.linalg.expm_frechet(tau * A.T, np.outer(g_j, y0), compute_expm=False)
        for tau, g_j in zip(taus, g)
    ]
    scale = lambda terms: sum(np.max(np.abs(t)) for t in terms)  # noqa: E731
    return ys, (sum(terms_y0), scale(terms_y0)), (sum(terms_a), scale(terms_a))


def _check_against_reference(problem, ys, grad_y0, grad_a):
    """`ys[len(ts), n]`, `grad_y0[n]` and `grad_a[n, n]` (NumPy) against `_reference`."""
    ref_ys, (ref_y0, scale_y0), (ref_a, scale_a) = _reference(problem)
    np.testing.assert_array_equal(ys[0], problem["y0"])  # ys[0] is y0, exactly
    size = np.max(np.abs(ref_ys))
    np.testing.assert_allclose(ys, ref_ys, rtol=0, atol=FACTOR * (RTOL * size + ATOL))
    relative = FACTOR * (RTOL + ATOL / size)
    for name, got, ref, scale in (("y0", grad_y0, ref_y0, scale_y0), ("A", grad_a, ref_a, scale_a)):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(
            got, ref, rtol=0, atol=relative * scale, err_msg=f"dL/d{name}"
        )


_F64 = tf.float64


@tf.function(
    input_signature=[
        tf.TensorSpec([None, None], _F64),  # A
        tf.TensorSpec([None], _F64),  # y0
        tf.TensorSpec([None], _F64),  # ts
        tf.TensorSpec([None, None], _F64),  # weights
    ]
)
def _vector_solve(A, y0, ts, weights):
    """One graph for every size and number of times: each example runs, none traces."""
    with tf.GradientTape() as tape:
        tape.watch([y0, A])
        # Loops not compiled: XLA would compile them once per shape drawn (up to 30 here);
        # tests/test_jit.py shows compiled loops give the same numbers.
        ys = tfaca.odeint(
            lambda t, y, A: tf.linalg.matvec(A, y), y0, ts, args=(A,), rtol=RTOL, atol=ATOL,
            jit_compile=False,
        )
        loss = _loss(weights, ys)
    return ys, tape.gradient(loss, [y0, A])


@settings(max_examples=50, deadline=None, database=None)
@given(linear_problems(nested=False))
def test_property_linear_system_matches_expm(problem):
    """Vectors of 1..6 components, 2..6 increasing or decreasing times: states, dL/dy0
    and dL/dA (A passed through `args`) match expm and its Fréchet derivative."""
    ys, (grad_y0, grad_a) = _vector_solve(
        problem["A"], problem["y0"], problem["ts"], problem["weights"]
    )
    _check_against_reference(problem, ys.numpy(), grad_y0.numpy(), grad_a.numpy())


def _check_nested(problem):
    layout = problem["layout"]
    num_times = len(problem["ts"])
    A = tf.constant(problem["A"])
    y0 = layout.pack(tf.constant(problem["y0"]))

    def func(t, y, A):
        return layout.pack(tf.linalg.matvec(A, layout.unpack(y)))

    with tf.GradientTape() as tape:
        tape.watch([y0, A])
        ys = tfaca.odeint(func, y0, problem["ts"], args=(A,), rtol=RTOL, atol=ATOL)
        flat = layout.unpack(ys, lead=(num_times,))
        loss = _loss(problem["weights"], flat)
    grad_y0, grad_a = tape.gradient(loss, [y0, A])

    # Outputs and the y0 gradient have y0's structure (outputs with a time axis in front).
    tf.nest.assert_same_structure(ys, y0)
    tf.nest.assert_same_structure(grad_y0, y0)
    for out, grad, start in zip(*map(tf.nest.flatten, (ys, grad_y0, y0))):
        assert tuple(out.shape) == (num_times,) + tuple(start.shape)
        assert tuple(grad.shape) == tuple(start.shape)
    _check_against_reference(
        problem, flat.numpy(), layout.unpack(grad_y0).numpy(), grad_a.numpy()
    )


# Eager solves (each structure would trace a graph of its own, which costs as much):
# ~0.5 s an example, so the quick property samples fewer examples than the vector one.
@settings(max_examples=8, deadline=None, database=None)
@given(linear_problems(nested=True))
@pytest.mark.slow
def test_property_nested_state_matches_expm(problem):
    """A tensor (vector, row or column), a tuple or a dict (keys out of slice order) of
    components: each output and gradient component is its slice of the reference."""
    _check_nested(problem)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None)
@given(linear_problems(nested=True))
def test_property_nested_state_matches_expm_many(problem):
    _check_nested(problem)


# --------------------------------------------------------------------------------------
# 2. Faults: fit killed mid-epoch, resumed by BackupAndRestore
# --------------------------------------------------------------------------------------
#
# Weights are compared for exact equality (tolerance zero). Every process runs the same
# code on the same inputs on the same machine with the same thread pools, and
# TensorFlow's CPU kernels are deterministic for fixed shapes, so a run is reproducible
# bit for bit across processes (the references run in a process of their own, so the
# tests check that too). A resume that restored anything less than the exact state (one
# ulp of one weight, Adam's moments or its step count) would change the adaptive
# solver's steps and every later update, and show; no tolerance would be principled.
#
# Keras 3's BackupAndRestore restores the weights, the optimizer and the *epoch* of its
# last backup, not the batch: `_load_model` sets only `model._initial_epoch`, and the
# batch it writes to `training_metadata.json` is never read. A backup made mid-epoch
# (integer `save_freq`) is therefore resumed by training that epoch again from its first
# batch, so the batches before the backup are trained twice (`fit_worker.replayed_fit`);
# only a backup at an epoch's end (`save_freq="epoch"`) resumes as the uninterrupted run.

WORKER = TESTS / "fit_worker.py"
TIMEOUT = 300  # seconds for a subprocess: a hang fails instead of blocking




def _run_workers(tmp_path, runs):
    """Runs `{name: [worker args]}` side by side; returns `{name: (returncode, stdout,
    stderr)}`. A process still running at the deadline is killed (returncode None)."""
    procs = {}
    try:
        for name, args in runs.items():
            out = open(tmp_path / f"{name}.out", "w")
            err = open(tmp_path / f"{name}.err", "w")
            procs[name] = (
                subprocess.Popen(
                    [sys.executable, str(WORKER), *map(str, args)],
                    stdout=out, stderr=err, env=child_env(), cwd=str(tmp_path),
                ),
                out,
                err,
            )
        results = {}
        for name, (proc, out, err) in procs.items():
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            results[name] = proc.poll()
    finally:
        for proc, out, err in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    return {
        name: (
            code,
            (tmp_path / f"{name}.out").read_text(),
            (tmp_path / f"{name}.err").read_text(errors="replace")[-5000:],
        )
        for name, code in results.items()
    }


def _result(run):
    code, stdout, stderr = run
    assert code == 0, f"exit code {code} (None: timed out)\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"no RESULT line:\n{stdout}\n{stderr}"
    return json.loads(lines[0][len("RESULT "):])


def _weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _assert_weights_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"weight {i}")


def _killed_and_resumed(tmp_path, save_freq, kill_epoch, kill_batch, reference_args):
    """Runs the reference beside a fit that kills itself at (kill_epoch, kill_batch),
    checks how it died and what its backup holds, then resumes it in a new process."""
    backup = tmp_path / "backup"
    runs = _run_workers(
        tmp_path,
        {
            "reference": ["reference", tmp_path / "reference", *reference_args],
            "killed": [
                "fit", tmp_path / "killed", "--backup", backup, "--save-freq", save_freq,
                "--kill", kill_epoch, kill_batch,
            ],
        },
    )
    code, stdout, stderr = runs["killed"]
    assert code == -signal.SIGKILL, f"exit code {code}\n{stderr}"
    assert "RESULT" not in stdout and not (tmp_path / "killed.npz").exists()
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert (backup / "latest.weights.h5").exists()
    resumed = _run_workers(
        tmp_path,
        {"resumed": ["fit", tmp_path / "resumed", "--backup", backup, "--save-freq", save_freq]},
    )["resumed"]
    return _result(runs["reference"]), metadata, _result(resumed)["fit"]


@pytest.mark.slow
def test_fit_killed_after_a_mid_epoch_backup_resumes_exactly(tmp_path):
    """Backups every 2 batches (after batches 1 and 3 of each 4-batch epoch); SIGKILL as
    batch 3 of epoch 1 starts, so batch 2's update dies with the process. The resumed
    run restarts epoch 1 from the weights and optimizer state after its batch 1, and ends
    with exactly the weights, step count and losses of an uninterrupted run that trains
    epoch 1's batches 0-1 twice, as Keras 3 resumes (see above)."""
    reference, metadata, resumed = _killed_and_resumed(
        tmp_path, save_freq=2, kill_epoch=1, kill_batch=3, reference_args=["--replay", 1, 2]
    )
    assert metadata == {"epoch": 1, "batch": 1}  # the last backup: mid-epoch 1
    _assert_weights_equal(
        _weights(tmp_path / "resumed.npz"), _weights(tmp_path / "reference_replay.npz")
    )
    replay = reference["replay"]
    # 6 updates restored (epoch 0, epoch 1's batches 0-1), then epochs 1 and 2.
    steps = fit_worker.STEPS_PER_EPOCH
    assert resumed["iterations"] == replay["iterations"] == steps + 2 + 2 * steps
    assert resumed["losses"] == replay["losses"][-2:]


@pytest.mark.slow
def test_fit_killed_after_an_epoch_backup_resumes_as_uninterrupted(tmp_path):
    """Backup at each epoch's end; SIGKILL as batch 2 of epoch 1 starts (two updates of
    epoch 1 lost). The resumed run trains epochs 1 and 2 and ends with exactly the
    weights, optimizer step count and epoch losses of the uninterrupted run."""
    reference, metadata, resumed = _killed_and_resumed(
        tmp_path, save_freq="epoch", kill_epoch=1, kill_batch=2,
        reference_args=["--uninterrupted", "--replay", 1, 2],
    )
    assert metadata["epoch"] == 1  # the last backup: end of epoch 0
    uninterrupted = _weights(tmp_path / "reference.npz")
    _assert_weights_equal(_weights(tmp_path / "resumed.npz"), uninterrupted)
    steps = fit_worker.STEPS_PER_EPOCH
    uninterrupted_run = reference["uninterrupted"]
    assert resumed["iterations"] == uninterrupted_run["iterations"] == fit_worker.EPOCHS * steps
    assert resumed["losses"] == uninterrupted_run["losses"][1:]
    # What a mid-epoch backup would have given instead (the quick test above): other
    # weights. If Keras learns to resume mid-epoch, that test must compare with the
    # uninterrupted run.
    replay = _weights(tmp_path / "reference_replay.npz")
    assert any(not np.array_equal(a, b) for a, b in zip(replay, uninterrupted))


# --------------------------------------------------------------------------------------
# 3. Load: a SavedModel served from 8 threads at once
# --------------------------------------------------------------------------------------

THREADS = 8
CALLS_PER_THREAD = 25


def _ode_model():
    keras.utils.set_random_seed(0)
    dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)])
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="tanh"),
            tfaca.ODELayer(dynamics, t=(0.0, 0.5, 1.5), rtol=1e-5, atol=1e-7),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.slow
def test_savedmodel_served_from_8_threads_is_bitwise_serial(tmp_path):
    """Each thread serves its own batch (its own size, so its own adaptive steps) 25
    times through `serve` or the `serving_default` signature, all 8 starting together;
    every output equals, bit for bit, the serial output for that batch. The solver's
    loop keeps no state between calls, so concurrent calls cannot perturb each other."""
    model = _ode_model()
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    signature = served.signatures["serving_default"]
    rng = np.random.default_rng(0)
    batches = [
        tf.constant(rng.normal(scale=1.0 + i, size=(1 + 3 * i, 4)).astype("float32"))
        for i in range(THREADS)
    ]
    serial = [served.serve(x).numpy() for x in batches]
    np.testing.assert_allclose(serial[0], model(batches[0]).numpy(), rtol=1e-5, atol=1e-6)

    start = threading.Barrier(THREADS)

    def work(i):
        start.wait()  # all threads call at once
        outputs = []
        for _ in range(CALLS_PER_THREAD):
            if i % 2:
                (out,) = signature(batches[i]).values()
            else:
                out = served.serve(batches[i])
            outputs.append(out.numpy())
        return outputs

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))
    for i, outputs in enumerate(results):
        assert len(outputs) == CALLS_PER_THREAD
        for k, out in enumerate(outputs):
            np.testing.assert_array_equal(out, serial[i], err_msg=f"thread {i}, call {k}")


# --------------------------------------------------------------------------------------
# 4. Load: 1,000 solves neither retrace nor grow memory
# --------------------------------------------------------------------------------------
#
# Memory bound: the process's resident set (VmRSS) after 200 warm-up calls (graphs built,
# allocator pools and caches filled) and after all 1,000 may differ by at most 16 MiB.
# Measured growth over the 800 calls: under 1 MiB (allocator noise). What a leak would
# cost: a state here is 256 x 16 numbers (32 KiB in float64, 16 KiB in float32); each
# call allocates several of them (checkpoints, stages, outputs, gradients), and keeping
# even one alive per call grows the process by 800 x 32 KiB = 25 MiB (solves), or
# 800 x 16 KiB x 2 (input batch and ODE state) = 25 MiB (Keras). A retrace per call
# costs far more (a graph is MiBs). RSS cannot see smaller leaks; `tracemalloc` would
# miss TensorFlow's C++ allocations, which are the ones that matter here.
WARMUP, CALLS = 200, 1000
RSS_GROWTH_BOUND = 16 * 2**20


def _repeat(call):
    """Calls `call(i)` CALLS times; returns the RSS growth after the warm-up."""
    for i in range(WARMUP):
        call(i)
    rss = resident_bytes()
    for i in range(WARMUP, CALLS):
        call(i)
    return resident_bytes() - rss


@pytest.mark.slow
def test_1000_solves_with_gradients_trace_once_and_keep_memory():
    """A `tf.function` of `tfaca.solve` (dopri5, ACA) and its gradient with respect to
    y0, the field's weights (through `args`) and nothing else, called with new y0,
    weights and output times each time: one trace, and no memory growth."""
    func_traces = []

    def func(t, y, W):
        func_traces.append(None)  # Python runs only while tracing
        return tf.tanh(tf.matmul(y, W))

    @tf.function
    def solve_and_grad(y0, W, ts):
        with tf.GradientTape() as tape:
            tape.watch([y0, W])
            sol = tfaca.solve(func, y0, ts, args=(W,), rtol=1e-3, atol=1e-6)
            loss = tf.reduce_sum(sol.ys[-1] ** 2)
        return loss, tape.gradient(loss, [y0, W]), sol.stats.num_steps

    rng = np.random.default_rng(0)
    steps = []

    def call(i):
        y0 = tf.constant(rng.normal(size=(256, 16)))
        W = tf.constant(rng.normal(scale=0.5, size=(16, 16)))
        ts = tf.constant(np.cumsum(rng.uniform(0.2, 0.8, size=3)))
        loss, (g_y0, g_w), num_steps = solve_and_grad(y0, W, ts)
        steps.append(int(num_steps))
        if i % 100 == 0:
            assert np.isfinite(float(loss)) and np.all(np.isfinite(g_w.numpy()))
            assert float(tf.reduce_max(tf.abs(g_y0))) > 0

    growth = _repeat(call)
    assert solve_and_grad.experimental_get_tracing_count() == 1
    traces = len(func_traces)
    solve_and_grad(
        tf.constant(rng.normal(size=(256, 16))),
        tf.eye(16, dtype=tf.float64),
        tf.constant([0.0, 1.0, 2.0], tf.float64),
    )
    assert len(func_traces) == traces  # the field was not traced again either
    assert len(set(steps)) > 1  # new values did change the adaptive solve
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"


class _CountingDense(keras.layers.Layer):
    """Dense(tanh) that counts how often its Python `call` runs: in a compiled train or
    predict step, only while tracing."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, activation="tanh")
        self.calls = 0

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, y):
        self.calls += 1
        return self.dense(y)


def _counting_model():
    keras.utils.set_random_seed(0)
    counter = _CountingDense(16)
    dynamics = keras.Sequential([counter, keras.layers.Dense(16)])
    model = keras.Sequential([keras.Input((16,)), tfaca.ODELayer(dynamics), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-2), "mse", jit_compile=False)
    return model, counter


def _keras_loop(method):
    model, counter = _counting_model()
    rng = np.random.default_rng(0)
    traced = []

    def call(i):
        x = rng.normal(size=(256, 16)).astype("float32")
        if method == "train_on_batch":
            y = rng.normal(size=(256, 1)).astype("float32")
            logs = model.train_on_batch(x, y, return_dict=True)
            assert np.isfinite(logs["loss"])
        else:
            assert np.all(np.isfinite(model.predict_on_batch(x)))
        if i == WARMUP - 1:
            traced.append(counter.calls)

    growth = _repeat(call)
    assert counter.calls == traced[0], "the step was traced again after the warm-up"
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.slow
def test_1000_keras_predict_on_batch_trace_once_and_keep_memory():
    _keras_loop("predict_on_batch")


@pytest.mark.slow
def test_1000_keras_train_on_batch_trace_once_and_keep_memory():
    _keras_loop("train_on_batch")
