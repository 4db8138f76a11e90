"""The solver's loops compiled with XLA inside an uncompiled graph (`jit_compile=`)."""

import gc
import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from tfaca import _jit

from helpers import A_NP, COMPILED_RTOL, assert_relative, count_xla_compilations, resident_bytes

RNG = np.random.default_rng(3)
W1 = RNG.normal(size=(4, 16)) * 0.5
W2 = RNG.normal(size=(16, 4)) * 0.5


def _mlp(dtype):
    w1, w2 = tf.Variable(W1.astype(dtype)), tf.Variable(W2.astype(dtype))

    def func(t, y, scale):
        return scale * tf.tanh(y @ w1) @ w2 - 0.1 * y

    return func, [w1, w2]


def _compiled_functions(concrete):
    """Names of the functions in a traced graph that XLA must compile."""
    library = concrete.graph.as_graph_def().library.function
    return [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]


def _solve_and_grad(gradient, jit, *, ts, dtype="float64", nested=False):
    func, weights = _mlp(dtype)
    rng = np.random.default_rng(7)  # the same inputs for every call
    y0 = tf.constant(rng.normal(size=(5, 4)).astype(dtype))
    scale = tf.constant(1.3, dtype)
    if nested:
        base = func
        func = lambda t, y, s: {"a": base(t, y["a"], s), "b": -0.5 * y["b"] + y["a"][:, :2]}  # noqa: E731
        y0 = {"a": y0, "b": tf.constant(rng.normal(size=(5, 2)).astype(dtype))}

    @tf.function
    def run(y0, ts, scale):
        with tf.GradientTape() as tape:
            tape.watch([y0, ts, scale])
            sol = tfaca.solve(func, y0, ts, args=(scale,), gradient=gradient, rtol=1e-6,
                              atol=1e-8, jit_compile=jit)
            loss = sum(tf.reduce_sum(tf.sin(y)) for y in tf.nest.flatten(sol.ys))
        grads = tape.gradient(loss, [y0, ts, scale, weights])
        return sol.ys, grads, sol.stats.num_steps

    ts = tf.constant(np.asarray(ts, dtype))
    out = run(y0, ts, scale)
    return out, _compiled_functions(run.get_concrete_function(y0, ts, scale))


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "gradient, case",
    [("aca", "two_times"), ("aca", "per_sample"), ("adjoint", "dense"),
     pytest.param("aca", "dense", marks=_SLOW), pytest.param("aca", "nested", marks=_SLOW),
     pytest.param("aca", "backward", marks=_SLOW),
     pytest.param("adjoint", "two_times", marks=_SLOW),
     pytest.param("adjoint", "per_sample", marks=_SLOW),
     pytest.param("adjoint", "nested", marks=_SLOW),
     pytest.param("adjoint", "backward", marks=_SLOW)],
)
@pytest.mark.slow_variants
def test_compiled_loops_give_the_same_solution_and_gradients(gradient, case):
    ts = {
        "two_times": [0.0, 1.5],
        "dense": [0.0, 0.3, 0.9, 1.5],
        "per_sample": [[0.0, 0.4, 1.5], [0.0, 0.2, 0.2], [0.0, 1.0, 1.1], [0.0, 0.5, 0.6],
                       [0.0, 1.5, 1.5]],
        "nested": [0.0, 0.7, 1.5],
        "backward": [1.5, 0.8, 0.0],
    }[case]
    nested = case == "nested"
    plain, none = _solve_and_grad(gradient, False, ts=ts, nested=nested)
    jitted, names = _solve_and_grad(gradient, True, ts=ts, nested=nested)
    assert none == [] and len(names) == 2  # the forward loop and the backward pass
    assert int(plain[2]) == int(jitted[2])  # the same accepted steps
    for a, b in zip(tf.nest.flatten(plain[:2]), tf.nest.flatten(jitted[:2])):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_float32_to_rounding():
    plain, _ = _solve_and_grad("aca", False, ts=[0.0, 0.5, 1.5], dtype="float32")
    jitted, names = _solve_and_grad("aca", True, ts=[0.0, 0.5, 1.5], dtype="float32")
    assert len(names) == 2 and int(plain[2]) == int(jitted[2])
    for a, b in zip(tf.nest.flatten(plain[:2]), tf.nest.flatten(jitted[:2])):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=2e-4, atol=2e-5)


def _decision(func, y0, gradient="aca", option="auto"):
    """What `solve` decided, read from the graph it built: compiled functions or none."""

    @tf.function
    def run(y0):
        return tfaca.solve(func, y0, [0.0, 1.0], gradient=gradient, jit_compile=option).ys

    return bool(_compiled_functions(run.get_concrete_function(y0)))


def test_auto_compiles_vector_fields_and_convolutions_only_on_a_gpu():
    """"auto" compiles the loops of a field XLA compiles; of a convolution only where a GPU
    is visible (on a CPU, XLA runs convolution gradients inside a loop slowly)."""
    gpu = bool(tf.config.list_logical_devices("GPU"))
    y = tf.ones([2, 4])
    w = tf.Variable(tf.eye(4))
    assert _decision(lambda t, y: -(y @ w), y)
    assert _decision(lambda t, y: -(y @ w), y, gradient="adjoint")
    assert not _decision(lambda t, y: -(y @ w), y, gradient="naive")
    assert not _decision(lambda t, y: -(y @ w), y, option=False)

    image = tf.ones([2, 6, 6, 3])
    kernel = tf.Variable(tf.zeros([3, 3, 3, 3]))
    conv = lambda t, y: tf.nn.conv2d(y, kernel, 1, "SAME")  # noqa: E731
    assert _decision(conv, image) is gpu
    assert _decision(conv, image, option=True)  # asked for: compiled all the same
    depthwise = keras.layers.DepthwiseConv2D(3, padding="same")
    depthwise.build(image.shape)
    assert _decision(lambda t, y: depthwise(y), image) is gpu
    # Not compilable by XLA: a Python function inside the dynamics.
    py = lambda t, y: tf.numpy_function(lambda a: -a, [y], tf.float32, stateful=False)  # noqa: E731
    assert not _decision(lambda t, y: tf.ensure_shape(py(t, y), y.shape), y)


def test_compiled_loops_run_in_a_replica_of_a_distribution_strategy():
    """`strategy.run` of a solve: "auto" compiles the loops there too, False does not,
    and the replica computes the solution."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # a CPU replica on every machine
    with strategy.scope():
        w = tf.Variable(tf.eye(4))
    y = tf.ones([2, 4])
    for option, expected in (("auto", True), (False, False)):
        @tf.function
        def replica(y, option=option):
            return tfaca.odeint(lambda t, y: -(y @ w), y, [0.0, 1.0], jit_compile=option)[-1]

        @tf.function
        def step(y):
            return strategy.run(replica, args=(y,))

        with strategy.scope():
            concrete = step.get_concrete_function(y)
        assert bool(_compiled_functions(concrete)) is expected, option
        np.testing.assert_allclose(step(y).numpy(), np.exp(-1.0) * np.ones([2, 4]), rtol=5e-3)


def test_auto_does_not_compile_eagerly_and_true_does():
    w = tf.Variable(tf.eye(3, dtype=tf.float64))
    y0 = tf.constant([1.0, 0.5, -0.2], tf.float64)
    func = lambda t, y: -tf.linalg.matvec(w, y)  # noqa: E731
    assert _jit.decide("auto", lambda t, y, a: [func(t, y[0])], tf.float64, [y0], [],
                       "aca") is False  # eager: each call would compile again
    out = []
    for jit in (True, False):
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(func, y0, [0.0, 1.0], jit_compile=jit, rtol=1e-8, atol=1e-10)
            loss = ys[-1][0]
        out.append((ys.numpy(), tape.gradient(loss, w).numpy()))
    (ys, grad), (ref, ref_grad) = out
    np.testing.assert_allclose(ys, ref, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10)


def test_failures_still_raise_with_compiled_loops():
    func = lambda t, y: tf.linalg.matvec(tf.constant(A_NP), y)  # noqa: E731
    y0 = tf.constant([1.0, 0.0, 0.5], tf.float64)

    @tf.function
    def too_few_steps(y0):
        return tfaca.odeint(func, y0, [0.0, 50.0], max_steps=3, jit_compile=True)

    with pytest.raises(tf.errors.InvalidArgumentError, match="MAX_STEPS_REACHED"):
        too_few_steps(y0)

    @tf.function
    def no_throw(y0):
        sol = tfaca.solve(func, y0, [0.0, 50.0], max_steps=3, jit_compile=True, throw=False)
        return sol.status, sol.ys

    status, ys = no_throw(y0)
    assert int(status) == int(tfaca.Status.MAX_STEPS_REACHED) and np.isnan(ys[-1]).all()


def test_replay_that_differs_from_the_forward_still_raises():
    """A `func` that draws random numbers: the compiled replay reports the mismatch and
    the check outside the compiled function raises, as without compilation."""
    w = tf.Variable(tf.eye(3, dtype=tf.float64))
    y0 = tf.constant([1.0, 0.5, -0.2], tf.float64)
    func = lambda t, y: -tf.linalg.matvec(w, y) * (1 + 0.1 * tf.random.uniform([], dtype=tf.float64))  # noqa: E731

    @tf.function
    def grad(y0):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tfaca.odeint(func, y0, [0.0, 1.0], jit_compile=True)[-1])
        return tape.gradient(loss, w)

    with pytest.raises(tf.errors.InvalidArgumentError, match="did not reproduce"):
        grad(y0)


def test_adjoint_failure_in_the_compiled_reverse_solve_raises():
    w = tf.Variable(tf.eye(3, dtype=tf.float64))
    y0 = tf.constant([1.0, 0.5, -0.2], tf.float64)
    func = lambda t, y: -tf.linalg.matvec(w, y)  # noqa: E731
    strategy = tfaca.AdjointGradient(max_steps=1)

    @tf.function
    def grad(y0):
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(func, y0, [0.0, 3.0], gradient=strategy, jit_compile=True)
            loss = tf.reduce_sum(ys[-1])
        return tape.gradient(loss, w)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"MAX_STEPS_REACHED[\s\S]*reverse solve"):
        grad(y0)


def test_solve_rejects_bad_options():
    func = lambda t, y: -y  # noqa: E731
    with pytest.raises(ValueError, match="`jit_compile`"):
        tfaca.solve(func, tf.ones([2]), [0.0, 1.0], jit_compile="always")
    with pytest.raises(ValueError, match="`jit_compile=True` cannot be used with"):
        tfaca.solve(func, tf.ones([2]), [0.0, 1.0], gradient="naive", jit_compile=True)


def _layer_model(jit, batchnorm=False):
    keras.utils.set_random_seed(1)
    norm = [keras.layers.BatchNormalization(momentum=0.5)] if batchnorm else []
    dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"), *norm,
                                 keras.layers.Dense(4)])
    model = keras.Sequential([keras.Input((4,)), tfaca.ODELayer(dynamics, jit_compile=jit),
                              keras.layers.Dense(1)])
    # SGD: a rounding difference in a gradient moves a weight by as much (Adam would
    # turn a tiny gradient's rounding into a step of the learning rate).
    model.compile(keras.optimizers.SGD(0.05), "mse")  # Keras' default: no XLA on CPU
    return model


@pytest.mark.parametrize("batchnorm", [False, pytest.param(True, marks=_SLOW)],
                         ids=["mlp", "batchnorm"])
def test_fit_with_compiled_loops_trains_like_without(batchnorm):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = np.sin(x.sum(axis=1, keepdims=True))
    results = []
    for jit in (False, "auto"):
        model = _layer_model(jit, batchnorm)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((history.history["loss"], model.get_weights(), model.predict(x, verbose=0)))
    (loss0, w0, p0), (loss1, w1, p1) = results
    # float32, XLA's arithmetic in another order, and eight SGD steps carry the rounding
    # on: with BatchNorm a weight differed by 7e-5 relative on an AVX-512 CPU.
    np.testing.assert_allclose(loss1, loss0, rtol=1e-4)
    for a, b in zip(w0, w1):  # BatchNorm's moving statistics included
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p1, p0, rtol=1e-4, atol=5e-5)  # float32 solves at rtol 1e-3
    # "auto" compiles the layer's loops in a graph that Keras does not compile.
    layer = _layer_model("auto", batchnorm).layers[0]
    traced = tf.function(lambda v: layer(v, training=True)).get_concrete_function(
        tf.TensorSpec([None, 4]))
    assert _compiled_functions(traced)


# Solves whose number of accepted steps drifts between calls, as in training: one
# subprocess runs the configurations in sequence (`compile_worker.py`) and XLA's log
# gives each call's compilations (`helpers.count_xla_compilations`).
_DRIFT = ["two_times", "dense"]
_DRIFT_MORE = ["stepped", "per_sample", "per_sample_dense", "times_per_sample",
               "per_sample_times", "budget", "mali", "adjoint", "adjoint_per_sample",
               "adjoint_times_per_sample", "eager", "eager_layer"]


@pytest.mark.parametrize("configs", [_DRIFT, pytest.param(_DRIFT_MORE, marks=_SLOW)],
                         ids=["quick", "more"])
def test_a_solve_compiles_once_whatever_its_step_count(configs):
    """The forward loop and the backward pass compile at the first call, never again: no
    input of theirs has a shape, or a value XLA takes as a constant, that follows the
    step count (a recompile costs 0.5-4 s of a training epoch)."""
    worker = str(pathlib.Path(__file__).with_name("compile_worker.py"))
    stdout, counts = count_xla_compilations([sys.executable, worker, ",".join(configs),
                                             "--calls", "3" if configs is _DRIFT else "5"])
    steps = json.loads(stdout.splitlines()[-1])
    for config in configs:
        assert len(set(steps[config])) > 1, (config, steps[config])  # the drift happened
        assert counts[config] == [2] + [0] * (len(steps[config]) - 1), (
            config, counts[config], steps[config])


def _reused(func):
    """The compiled functions kept for eager calls of `func`: `{role: traces}`."""
    token = _jit._TOKENS.get(id(func))
    return {key[-1]: entry.function.experimental_get_tracing_count()
            for key, entry in _jit._REUSED.items() if key[0] is token}


def _eager_solve(func, y0, c, rtol, jit):
    with tf.GradientTape() as tape:
        tape.watch([y0, c])
        ys = tfaca.odeint(func, y0, [0.0, 0.4, 1.5], args=(c,), rtol=rtol, atol=1e-8,
                          jit_compile=jit)
        loss = tf.reduce_sum(tf.sin(ys))
    return [ys, *tape.gradient(loss, [y0, c, *func.weights])]


def test_eager_calls_reuse_their_compiled_functions():
    """Repeated eager calls with `jit_compile=True` trace (and compile) the forward loop
    and the replay once, and give what `jit_compile=False` gives for each call's own
    inputs, `args` and tolerances; another function gets functions of its own, which go
    with it."""
    base, weights = _mlp("float64")
    func = lambda t, y, c: base(t, y, c)  # noqa: E731
    func.weights = weights
    rng = np.random.default_rng(5)
    calls = [(rng.normal(size=(5, 4)), 1.3, 1e-6), (rng.normal(size=(5, 4)) * 3, 0.7, 1e-6),
             (rng.normal(size=(5, 4)), 1.3, 1e-3)]
    results = []
    for y0, c, rtol in calls:
        y0, c = tf.constant(y0), tf.constant(c, tf.float64)
        jitted, plain = (_eager_solve(func, y0, c, rtol, jit) for jit in (True, False))
        for a, b in zip(jitted, plain):
            assert_relative([a.numpy()], [b.numpy()], COMPILED_RTOL)
        results.append(jitted)
    assert not np.allclose(results[0][0], results[2][0], rtol=1e-9, atol=0)  # rtol counted
    reused = _reused(func)
    assert len(reused) == 2 and set(reused.values()) == {1}, reused  # forward, replay

    other = lambda t, y, c: -c * y + 0.1 * tf.tanh(y @ weights[0]) @ weights[1]  # noqa: E731
    other.weights = weights
    y0, c = tf.constant(calls[0][0]), tf.constant(1.3, tf.float64)
    for a, b in zip(*(_eager_solve(other, y0, c, 1e-6, jit) for jit in (True, False))):
        assert_relative([a.numpy()], [b.numpy()], COMPILED_RTOL)
    assert len(_reused(other)) == 2 and _reused(func) == reused
    token = _jit._TOKENS[id(other)]
    del other
    gc.collect()
    assert not any(key[0] is token for key in _jit._REUSED)  # they went with it


def test_eager_reuse_compiles_anew_for_a_rebound_closure():
    """A tensor `func` closes over, rebound between calls: the second call compiles anew
    and solves with the new value, never the value the first call's trace captured."""
    y0 = tf.constant([1.0, -0.5], tf.float64)
    rate = tf.constant(0.5, tf.float64)
    decay = lambda t, y: -rate * y  # noqa: E731
    first = tfaca.odeint(decay, y0, [0.0, 1.0], rtol=1e-8, jit_compile=True)[-1]
    rate = tf.constant(2.0, tf.float64)
    second = tfaca.odeint(decay, y0, [0.0, 1.0], rtol=1e-8, jit_compile=True)[-1]
    np.testing.assert_allclose(first, y0.numpy() * np.exp(-0.5), rtol=1e-5)
    np.testing.assert_allclose(second, y0.numpy() * np.exp(-2.0), rtol=1e-5)
    assert list(_reused(decay).values()) == [1]  # the first value's function went


@pytest.mark.slow
def test_eager_reuse_keeps_counters_and_layer_calls_apart():
    """The adjoint's counters: instances sharing compiled functions count each their own.
    `ODELayer`: calls on other inputs reuse the compiled functions and give what the
    uncompiled layer gives."""
    y0 = tf.constant([1.0, -0.5], tf.float64)
    decay = lambda t, y: -0.5 * y  # noqa: E731
    for strategy in (tfaca.AdjointGradient(), tfaca.AdjointGradient()):
        with tf.GradientTape() as tape:
            tape.watch(y0)
            loss = tf.reduce_sum(tfaca.odeint(decay, y0, [0.0, 1.0], gradient=strategy,
                                              jit_compile=True))
        tape.gradient(loss, y0)
        assert int(strategy.backward_stats.num_steps) > 0  # each instance counts its own
    assert sorted(_reused(decay).values()) == [1, 1]  # the adjoint's forward and reverse

    keras.utils.set_random_seed(2)
    dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dense(4)])
    layer = tfaca.ODELayer(dynamics, jit_compile=True)
    plain = tfaca.ODELayer(dynamics, jit_compile=False)
    for scale in (1.0, 4.0):
        x = tf.constant(np.random.default_rng(3).normal(size=(6, 4)) * scale, tf.float32)
        out = []
        for lay in (layer, plain):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(lay(x) ** 2)
            out.append([loss, *tape.gradient(loss, dynamics.trainable_variables)])
        for a, b in zip(*out):  # float32, which XLA rounds otherwise
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                       atol=1e-4 * np.abs(b.numpy()).max())
    assert sorted(_reused(layer).values()) == [1, 1]


@pytest.mark.slow
def test_eager_compiled_calls_do_not_grow_memory():
    """30 eager solves with their gradient, `tfaca.odeint` and `ODELayer` calls with
    `jit_compile=True`: the resident set grows by less than 1 MiB per call over the last
    20 (measured: about 0.01; a new compiled function per call grew it by 14 MiB per
    odeint and 18 MiB per layer call, XLA's compiled programs staying in its cache)."""
    w = tf.Variable(np.random.default_rng(1).normal(size=(4, 4)) * 0.5)
    x = tf.constant(np.random.default_rng(2).normal(size=(8, 4)))
    func = lambda t, y: tf.tanh(y @ w)  # noqa: E731
    keras.utils.set_random_seed(3)
    layer = tfaca.ODELayer(keras.Sequential([keras.layers.Dense(16, activation="tanh"),
                                             keras.layers.Dense(4)]), jit_compile=True)

    def solve(i):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tfaca.odeint(func, x * (1 + i % 3), [0.0, 1.0],
                                              jit_compile=True)[-1])
        tape.gradient(loss, w)

    def layer_call(i):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(tf.cast(x, tf.float32) * (1 + i % 3)) ** 2)
        tape.gradient(loss, layer.trainable_variables)

    for call in (solve, layer_call):
        for i in range(10):
            call(i)
        before = resident_bytes()
        for i in range(10, 30):
            call(i)
        per_call = (resident_bytes() - before) / 20
        assert per_call < 2**20, f"{call.__name__}: {per_call / 2**20:.2f} MiB per call"
