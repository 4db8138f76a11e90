"""`tfaca.ODELayer` in Keras: models of every kind train, the dynamics see `t` and
`training`, vector and image states, times as a second input, configs and saving,
SavedModel export served without tfaca, XLA, BatchNorm statistics, solve metrics, mixed
precision and bad arguments."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from tfaca._internals import in_xla_context, sublayers

STATE = 4
HIDDEN = 16
BATCH = 16


# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def mlp_dynamics(state=STATE, hidden=HIDDEN, name=None):
    return keras.Sequential(
        [keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(state)], name=name
    )


def conv_dynamics(channels, hidden=8):
    return keras.Sequential(
        [
            keras.layers.Conv2D(hidden, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(channels, 3, padding="same"),
        ]
    )


def regression_data(n=64, state=STATE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, state)).astype("float32")
    y = np.sin(x).sum(axis=1, keepdims=True).astype("float32")
    return x, y


def odeint_dynamics(dynamics, y0, ts, **kwargs):
    """The reference: `tfaca.odeint` on `dy/dt = dynamics(y)` (inference mode)."""
    return tfaca.odeint(lambda t, y: dynamics(y), y0, ts, **kwargs)


class TimeScaled(keras.layers.Layer):
    """dy/dt = t * y; records every `t` it receives (eagerly, as floats)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.times = []

    def call(self, y, t):
        if hasattr(t, "numpy"):
            self.times.append((tuple(t.shape), float(t)))
        return y * tf.cast(t, y.dtype)


class TrainingRecorder(keras.layers.Layer):
    """A Dense layer that records the `training` flag and the dtype of `y` it receives,
    and whether it was traced under XLA."""

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
        self.xla.append(in_xla_context())
        return self.dense(y)


class CountingBatchNorm(keras.layers.BatchNormalization):
    """BatchNormalization that counts (eagerly) the calls made in training mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.training_calls = 0

    def call(self, inputs, training=None, mask=None):
        if training:
            self.training_calls += 1
        return super().call(inputs, training=training, mask=mask)


class ODEModel(keras.Model):
    """A subclassed model: Dense -> ODELayer -> Dense."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(STATE, activation="tanh")
        self.ode = tfaca.ODELayer(mlp_dynamics())
        self.head = keras.layers.Dense(1)

    def call(self, x, training=None):
        return self.head(self.ode(self.encoder(x), training=training))


def sequential_model():
    return keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(mlp_dynamics()), keras.layers.Dense(1)]
    )


def functional_model():
    inputs = keras.Input((STATE,))
    h = keras.layers.Dense(STATE, activation="tanh")(inputs)
    h = tfaca.ODELayer(mlp_dynamics())(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def subclassed_model():
    model = ODEModel()
    model(np.zeros((1, STATE), "float32"))  # build
    return model


def ode_layer_of(model):
    layers = [layer for layer in sublayers(model) if isinstance(layer, tfaca.ODELayer)]
    assert len(layers) == 1
    return layers[0]


def weights_of(layer):
    return [np.array(w) for w in layer.get_weights()]


# --------------------------------------------------------------------------------------
# 1. Sequential, functional and subclassed models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [sequential_model, pytest.param(functional_model, marks=pytest.mark.slow),
     pytest.param(subclassed_model, marks=pytest.mark.slow)],
    ids=["sequential", "functional", "subclassed"],
)
def test_models_fit_evaluate_predict(build):
    x, y = regression_data()
    model = build()
    ode = ode_layer_of(model)
    dynamics_before = weights_of(ode.dynamics)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses
    # The gradient reached the dynamics: its weights moved.
    dynamics_after = weights_of(ode.dynamics)
    assert len(dynamics_after) == 4
    for before, after in zip(dynamics_before, dynamics_after):
        assert np.max(np.abs(after - before)) > 1e-4

    # evaluate on one batch is the loss of model(x) on that batch.
    results = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected_loss = float(np.mean((model(x).numpy() - y) ** 2))
    np.testing.assert_allclose(results["loss"], expected_loss, rtol=1e-5)
    assert results["loss"] < losses[0]

    # predict on one batch (<= 32) is model(x) on the same batch.
    batch = x[:32]
    predicted = model.predict(batch, verbose=0)
    assert predicted.shape == (32, 1)
    np.testing.assert_allclose(predicted, model(batch).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("times", [None, "rows", "vector"])
def test_symbolic_output_shape_matches_compute_output_shape_and_eager(return_sequences, times):
    layer = tfaca.ODELayer(mlp_dynamics(), t=(0.0, 0.5, 1.0), return_sequences=return_sequences)
    state = keras.Input((STATE,), batch_size=BATCH)
    ts_values = np.array([0.0, 0.2, 0.7, 1.0, 1.5], "float32")
    if times is None:
        inputs, input_shape, num_times = state, state.shape, 3
        eager_inputs = np.ones((BATCH, STATE), "float32")
    elif times == "rows":
        ts = keras.Input((5,), batch_size=BATCH)
        inputs, input_shape, num_times = [state, ts], [state.shape, ts.shape], 5
        eager_inputs = [np.ones((BATCH, STATE), "float32"), np.tile(ts_values, (BATCH, 1))]
    else:
        ts = keras.Input(batch_shape=(5,))
        inputs, input_shape, num_times = [state, ts], [state.shape, ts.shape], 5
        eager_inputs = [np.ones((BATCH, STATE), "float32"), ts_values]
    symbolic = layer(inputs)
    expected = (BATCH, num_times, STATE) if return_sequences else (BATCH, STATE)
    assert tuple(symbolic.shape) == expected
    assert tuple(layer.compute_output_shape(input_shape)) == expected
    assert tuple(layer(eager_inputs).shape) == expected


def test_functional_model_with_unknown_batch_and_times_input():
    state = keras.Input((STATE,))
    ts = keras.Input((5,))
    layer = tfaca.ODELayer(mlp_dynamics(), return_sequences=True)
    out = layer([state, ts])
    assert tuple(out.shape) == (None, 5, STATE)
    assert tuple(layer.compute_output_shape([(None, STATE), (None, 5)])) == (None, 5, STATE)
    model = keras.Model([state, ts], out)
    x = np.random.default_rng(0).normal(size=(8, STATE)).astype("float32")
    ts_values = np.array([0.0, 0.1, 0.5, 0.6, 2.0], "float32")
    predicted = model.predict([x, np.tile(ts_values, (8, 1))], verbose=0)
    expected = odeint_dynamics(layer.dynamics, x, ts_values)
    # predict runs in a graph, the reference eagerly: rounding differs slightly.
    np.testing.assert_allclose(predicted, np.transpose(expected, (1, 0, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamics", [mlp_dynamics, lambda: keras.layers.Dense(STATE)],
                         ids=["sequential", "dense"])
def test_times_input_as_a_tuple_eager(dynamics):
    """`_split` accepts `(state, times)` as a tuple as well as a list: so must `build`,
    which must build the dynamics for the state's shape, not for the pair of shapes."""
    layer = tfaca.ODELayer(dynamics(), return_sequences=True)
    x = np.random.default_rng(0).normal(size=(8, STATE)).astype("float32")
    ts = np.array([0.0, 0.3, 1.0], "float32")
    out = layer((x, ts))
    assert tuple(out.shape) == (8, 3, STATE)
    expected = odeint_dynamics(layer.dynamics, x, ts)
    np.testing.assert_allclose(out, np.transpose(expected, (1, 0, 2)), rtol=1e-6, atol=1e-6)
    assert tuple(layer.dynamics.get_build_config()["input_shape"]) == (8, STATE)


def test_times_input_as_a_tuple_symbolic():
    """Keras calls `compute_output_shape` with a tuple of shapes for a tuple input."""
    layer = tfaca.ODELayer(mlp_dynamics(), return_sequences=True)
    assert tuple(layer.compute_output_shape(((None, STATE), (None, 3)))) == (None, 3, STATE)
    symbolic = tfaca.ODELayer(mlp_dynamics(), return_sequences=True)(
        (keras.Input((STATE,)), keras.Input((3,)))
    )
    assert tuple(symbolic.shape) == (None, 3, STATE)


# --------------------------------------------------------------------------------------
# 2. The dynamics see the current time and the training flag
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t0, t1", [(0.5, 1.5), (1.5, 0.5)], ids=["forward", "backward"])
def test_dynamics_receive_the_current_time(t0, t1):
    dynamics = TimeScaled()
    layer = tfaca.ODELayer(dynamics, t=(t0, t1), rtol=1e-7, atol=1e-9)
    y0 = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    out = layer(y0).numpy()
    # dy/dt = t y: y(t1) = y0 exp((t1^2 - t0^2) / 2). Passing t - t0, or no t, gives
    # another value.
    np.testing.assert_allclose(out, y0 * np.exp((t1**2 - t0**2) / 2), rtol=1e-5, atol=1e-6)
    shapes = {shape for shape, _ in dynamics.times}
    values = np.array([value for _, value in dynamics.times])
    assert shapes == {()}, "t must be a scalar tensor"
    assert values.min() == pytest.approx(min(t0, t1))
    assert values.max() == pytest.approx(max(t0, t1))
    assert len(np.unique(values)) > 5


def test_float64_layer():
    layer = tfaca.ODELayer(TimeScaled(dtype="float64"), t=(0.0, 1.0), rtol=1e-10, atol=1e-12,
                           dtype="float64")
    y0 = np.random.default_rng(0).normal(size=(BATCH, STATE))
    out = layer(y0)
    assert out.dtype == tf.float64
    np.testing.assert_allclose(out, y0 * np.exp(0.5), rtol=1e-8)


def test_dynamics_receive_the_time_in_a_model():
    model = keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(TimeScaled(), t=(0.0, 1.0), rtol=1e-6, atol=1e-8)]
    )
    y0 = np.random.default_rng(1).normal(size=(BATCH, STATE)).astype("float32")
    np.testing.assert_allclose(model.predict(y0, verbose=0), y0 * np.exp(0.5), rtol=1e-5)


@pytest.mark.slow
def test_training_flag_is_forwarded():
    x, y = regression_data(n=32)
    recorder = TrainingRecorder(STATE)
    model = keras.Sequential([keras.Input((STATE,)), tfaca.ODELayer(recorder), keras.layers.Dense(1)])
    model.compile("adam", "mse", jit_compile=False)

    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert recorder.flags and all(flag is True for flag in recorder.flags), recorder.flags

    recorder.flags.clear()
    model.predict(x, verbose=0)
    assert recorder.flags and all(flag is False for flag in recorder.flags), recorder.flags

    recorder.flags.clear()
    model.evaluate(x, y, verbose=0)
    assert recorder.flags and all(flag is False for flag in recorder.flags), recorder.flags

    recorder.flags.clear()
    model.layers[0](x, training=True)
    assert recorder.flags and all(flag is True for flag in recorder.flags), recorder.flags


def test_dynamics_without_training_or_t_arguments():
    """A layer whose `call` takes neither `t` nor `training` gets neither."""

    class Plain(keras.layers.Layer):
        def call(self, y):
            return -y

    layer = tfaca.ODELayer(Plain(), rtol=1e-7, atol=1e-9)
    y0 = np.ones((2, STATE), "float32")
    np.testing.assert_allclose(layer(y0, training=True), np.exp(-1.0) * y0, rtol=1e-5)


def test_dynamics_in_torchdiffeqs_order_are_refused_with_the_fix():
    """`call(self, t, y)` would meet "multiple values for argument 't'" in the solve."""

    class TimeFirst(keras.layers.Layer):
        def call(self, t, y):
            return -y * t

    with pytest.raises(TypeError, match=r"`dynamics`.*dynamics\(y, t=t\).*call\(t, y\)"
                       r".*`def call\(self, y, t\)`"):
        tfaca.ODELayer(TimeFirst())(np.ones((2, STATE), "float32"))


# --------------------------------------------------------------------------------------
# 3. Vector states and NHWC feature maps
# --------------------------------------------------------------------------------------


def _vector_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, STATE)).astype("float32")
    labels = rng.integers(0, 2, size=BATCH).astype("int32")
    ode = tfaca.ODELayer(mlp_dynamics())
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(2)])
    return model, ode, x, labels, (BATCH, STATE)


def _image_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    labels = rng.integers(0, 2, size=8).astype("int32")
    ode = tfaca.ODELayer(conv_dynamics(3), method="heun_euler", rtol=1e-2, atol=1e-2)
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), ode, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)]
    )
    return model, ode, x, labels, (8, 6, 6, 3)


@pytest.mark.parametrize("case", [_vector_case, _image_case], ids=["vector", "image"])
@pytest.mark.slow
def test_vector_and_image_states(case):
    model, ode, x, labels, state_shape = case()
    out = ode(x)
    assert tuple(out.shape) == state_shape
    assert tuple(ode.compute_output_shape((None,) + state_shape[1:])) == (None,) + state_shape[1:]
    reference = odeint_dynamics(ode.dynamics, x, [0.0, 1.0], method=ode.method,
                                rtol=ode.rtol, atol=ode.atol)[-1]
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(out.numpy() - x)) > 1e-3  # it did integrate

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    dynamics_vars = {id(v) for v in ode.dynamics.trainable_variables}
    assert len(grads) == len(model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None, v.path
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), v.path
        if id(v) in dynamics_vars and "kernel" in v.path:
            assert np.max(np.abs(g)) > 0, v.path

    model.compile(keras.optimizers.Adam(1e-2), loss_fn, jit_compile=False)
    before = weights_of(ode.dynamics)
    history = model.fit(x, labels, batch_size=len(x), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(weights_of(ode.dynamics), before))


# --------------------------------------------------------------------------------------
# 4. Times as a second input (irregular series)
# --------------------------------------------------------------------------------------

IRREGULAR = np.array([0.0, 0.13, 0.5, 0.52, 1.7], "float32")


def _times_layer(return_sequences=False, interpolate=True):
    # The layer's own t is deliberately different: times given as an input replace it.
    return tfaca.ODELayer(mlp_dynamics(), t=(0.0, 5.0), rtol=1e-5, atol=1e-7,
                          return_sequences=return_sequences, interpolate=interpolate)


@pytest.mark.parametrize("interpolate", [True, False])
def test_times_input_of_an_empty_batch(interpolate):
    """A `[state, times]` call on an empty batch (a replica's share of a short batch), in
    a graph of unknown batch: empty outputs and a gradient (interpolate=False read row 0
    of the times, which an empty batch does not have)."""
    layer = _times_layer(interpolate=interpolate)

    @tf.function(input_signature=[tf.TensorSpec([None, STATE]), tf.TensorSpec([None, 5])])
    def run(x, ts):
        with tf.GradientTape() as tape:
            out = layer([x, ts])
            loss = tf.reduce_sum(out)
        return out, tape.gradient(loss, layer.trainable_variables)

    layer([np.zeros((1, STATE), "float32"), IRREGULAR[None]])  # build
    out, grads = run(tf.zeros([0, STATE]), tf.zeros([0, 5]))
    assert out.shape == (0, STATE)
    assert all(np.all(g.numpy() == 0) for g in grads)


@pytest.mark.parametrize("rows", [False, True], ids=["vector", "rows"])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.slow_variants
def test_times_input_matches_odeint(rows, return_sequences):
    layer = _times_layer(return_sequences)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    ts = np.tile(IRREGULAR, (BATCH, 1)) if rows else IRREGULAR
    out = layer([x, ts]).numpy()
    expected = odeint_dynamics(layer.dynamics, x, IRREGULAR, rtol=1e-5, atol=1e-7).numpy()
    if return_sequences:
        assert out.shape == (BATCH, len(IRREGULAR), STATE)
        np.testing.assert_allclose(out, np.transpose(expected, (1, 0, 2)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[:, 0], x)
    else:
        assert out.shape == (BATCH, STATE)
        np.testing.assert_allclose(out, expected[-1], rtol=1e-6, atol=1e-6)
    # And in a graph: the same steps; interpolated float32 outputs agree to the rounding
    # of the interpolant's weighted sums (its weights reach ~10 and partly cancel).
    graph_out = tf.function(lambda a, b: layer([a, b]))(x, ts).numpy()
    np.testing.assert_allclose(graph_out, out, rtol=1e-5, atol=1e-5)


def test_times_input_gradient_reaches_the_times():
    layer = tfaca.ODELayer(mlp_dynamics(), rtol=1e-6, atol=1e-8)
    x = tf.constant(np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32"))
    ts = tf.constant(IRREGULAR)
    with tf.GradientTape() as tape:
        tape.watch(ts)
        out = layer([x, ts])
        loss = tf.reduce_sum(out)
    g_ts = tape.gradient(loss, ts)
    assert g_ts is not None
    # d/dT sum(y(T)) = sum(f(y(T))); intermediate output times do not matter here.
    np.testing.assert_allclose(g_ts[-1], tf.reduce_sum(layer.dynamics(out)), rtol=1e-3)
    np.testing.assert_allclose(g_ts[1:-1], 0.0, atol=1e-3)


@pytest.mark.parametrize("mode", ["eager", "graph", "predict"])
def test_times_input_unequal_rows_raise(mode):
    """Stepping onto the outputs (interpolate=False), one solve needs one row of times;
    times per sample are `test_dense_output.py`'s."""
    layer = _times_layer(interpolate=False)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    ts = np.tile(IRREGULAR, (BATCH, 1))
    ts[3, 2] = 0.6
    with pytest.raises(tf.errors.InvalidArgumentError, match="every row of the times") as info:
        if mode == "eager":
            layer([x, ts])
        elif mode == "graph":
            tf.function(lambda a, b: layer([a, b]))(x, ts)
        else:
            state, times = keras.Input((STATE,)), keras.Input((len(IRREGULAR),))
            model = keras.Model([state, times], layer([state, times]))
            model.predict([x, ts], batch_size=BATCH, verbose=0)
    # It says what to do, and what it received: the shape and which rows differ.
    message = str(info.value)
    assert "Use interpolate=True (the default) for times per sample" in message
    assert "pass the times as one row (a 1-D tensor)" in message
    assert re.search(r"Received: times of shape\D*16\D+5\D+whose rows\D+3\D+differ from row 0",
                     message), message


def test_times_input_unequal_rows_fail_the_solve_under_xla():
    """XLA cannot assert: unequal rows make the solve fail (NaN outputs, failures
    metric), never a solve of every row at row 0's times."""
    layer = _times_layer(interpolate=False)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    ts = np.tile(IRREGULAR, (BATCH, 1)).astype("float32")
    run = tf.function(lambda a, b: layer([a, b]), jit_compile=True)
    assert np.all(np.isfinite(run(x, ts).numpy()))
    ts[3, 2] = 0.6
    assert np.all(np.isnan(run(x, ts).numpy()))


@pytest.mark.slow
def test_times_input_trains_in_a_model():
    x, y = regression_data(n=32)
    state, times = keras.Input((STATE,)), keras.Input((len(IRREGULAR),))
    layer = tfaca.ODELayer(mlp_dynamics(), return_sequences=True)
    h = keras.layers.Flatten()(layer([state, times]))
    model = keras.Model([state, times], keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    ts = np.tile(IRREGULAR, (len(x), 1))
    history = model.fit([x, ts], y, batch_size=BATCH, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(t=(0.0, 0.4, 1.0), method="bosh3", rtol=1e-4, atol=1e-5, first_step=0.05,
             max_steps=321, return_sequences=True),
        dict(t=(0.0, 0.5), method="rk4", step_size=0.1),
        dict(t=(1.0, 0.0), method="heun_euler", rtol=1e-2, atol=1e-2),
        dict(method="tsit5", gradient="naive"),
        dict(max_step=0.1),
        dict(safety=0.5),
        dict(rtol=1e-6, atol=1e-8, first_step=1.0, factor_min=0.6),  # rejects trial steps
        dict(factor_max=1.5),
        dict(rtol=np.float32(1e-5), atol=np.array([1e-6, 1e-7, 1e-6, 1e-8])),
    ],
    ids=["bosh3", "rk4", "heun_euler_backward", "tsit5_naive", "max_step", "safety",
         "factor_min", "factor_max", "numpy_tolerances"],
)
def test_options_reach_the_solve(kwargs):
    """The layer's output and cost are those of `tfaca.solve` with the same options."""
    layer = tfaca.ODELayer(mlp_dynamics(), **kwargs)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    out = layer(x).numpy()
    options = {k: v for k, v in kwargs.items() if k not in ("t", "return_sequences")}
    sol = tfaca.solve(lambda t, y: layer.dynamics(y), x, list(layer.t), **options)
    controller = {"max_step", "safety", "factor_min", "factor_max"}
    if controller & set(options):
        # The option changes the solve, so a layer that dropped it would fail below.
        default = tfaca.solve(lambda t, y: layer.dynamics(y), x, list(layer.t),
                              **{k: v for k, v in options.items() if k not in controller})
        assert np.any(default.ys.numpy() != sol.ys.numpy())  # other steps were taken
    expected = sol.ys.numpy()
    expected = np.transpose(expected, (1, 0, 2)) if layer.return_sequences else expected[-1]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert float(layer.steps_tracker.result()) == float(sol.stats.num_steps)
    assert float(layer.fevals_tracker.result()) == float(sol.stats.num_fevals)


def test_failed_solve_raises():
    tight = dict(rtol=1e-9, atol=1e-9, max_steps=3)
    layer = tfaca.ODELayer(mlp_dynamics(), **tight)
    x, y = regression_data(n=BATCH)
    with pytest.raises(tfaca.SolveError, match="max_steps=3"):
        layer(x)
    model = keras.Sequential([keras.Input((STATE,)), layer])
    model.compile("sgd", "mse", jit_compile=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_steps"):
        model.fit(x, np.zeros_like(x), verbose=0)


# --------------------------------------------------------------------------------------
# 5. Configs, serialization and .keras files
# --------------------------------------------------------------------------------------

NON_DEFAULT = dict(
    t=(0.0, 0.4, 1.0),
    method="bosh3",
    rtol=1e-4,
    atol=1e-5,
    gradient="naive",
    step_size=None,
    first_step=0.05,
    max_step=0.3,
    max_steps=321,
    safety=0.8,
    factor_min=0.3,
    factor_max=4.0,
    throw=False,
    return_sequences=True,
    jit_compile=False,
    per_sample=True,
    name="my_ode",
)
FIXED_STEP = dict(t=(0.0, 0.5), method="rk4", step_size=0.1, jit_compile=True, name="fixed_ode")
# NumPy values, as a user computing tolerances per feature passes them: scalars of
# either float type and per-element arrays. A config must hold them as plain numbers.
NUMPY = dict(
    rtol=np.float32(1e-4),
    atol=np.array([1e-5, 1e-6, 1e-5, 1e-7]),
    first_step=np.float64(0.05),
    name="numpy_ode",
)
CONFIGS = [NON_DEFAULT, FIXED_STEP, NUMPY]
CONFIG_IDS = ["adaptive", "fixed", "numpy"]


def _built_layer(kwargs):
    layer = tfaca.ODELayer(mlp_dynamics(name="dyn"), **kwargs)
    x = np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32")
    return layer, x, layer(x).numpy()


def _json(config):
    """A config in JSON's normal form (tuples become lists), as stored in files."""
    return json.loads(json.dumps(config))


def _check_values(config, kwargs):
    for key, value in kwargs.items():
        if key == "t":
            assert config["t"] == list(value)
        elif isinstance(value, (np.ndarray, np.generic)):
            # The same numbers, as Python floats or lists of them.
            assert type(config[key]) is (list if np.ndim(value) else float), key
            np.testing.assert_array_equal(np.asarray(config[key], value.dtype), value)
        else:
            assert config[key] == value, key
    json.dumps(config)  # plain JSON, without Keras' encoder for NumPy values


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.slow_variants
def test_get_config_from_config(kwargs):
    layer, x, out = _built_layer(kwargs)
    config = layer.get_config()
    _check_values(config, kwargs)
    clone = tfaca.ODELayer.from_config(config)
    assert clone.get_config() == config
    clone(x)  # build
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), out)
    if kwargs.get("return_sequences"):
        assert out.shape == (BATCH, 3, STATE)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
def test_serialize_through_json(kwargs):
    layer, x, out = _built_layer(kwargs)
    text = json.dumps(keras.saving.serialize_keras_object(layer))
    restored = keras.saving.deserialize_keras_object(json.loads(text))
    assert isinstance(restored, tfaca.ODELayer)
    assert _json(restored.get_config()) == _json(layer.get_config())
    restored(x)
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(restored(x).numpy(), out)


def test_from_config_reads_arrays_as_keras_serializes_them():
    """Configs saved while `get_config` kept NumPy arrays (or tensors) hold Keras'
    `{"class_name": "__numpy__" or "__tensor__", ...}` dicts; they load, same values."""
    layer, x, out = _built_layer(NUMPY)
    config = layer.get_config()
    config["atol"] = keras.saving.serialize_keras_object(NUMPY["atol"])
    config["first_step"] = keras.saving.serialize_keras_object(tf.constant(NUMPY["first_step"]))
    assert config["atol"]["class_name"] == "__numpy__"
    assert config["first_step"]["class_name"] == "__tensor__"
    clone = tfaca.ODELayer.from_config(_json(config))
    _check_values(clone.get_config(), {k: v for k, v in NUMPY.items() if k != "name"})
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), out)


def test_config_of_a_solver_instance_and_gradient_class():
    layer = tfaca.ODELayer(mlp_dynamics(), method=tfaca.Tsit5(), gradient=tfaca.NaiveGradient)
    config = layer.get_config()
    assert config["method"] == "tsit5"
    assert config["gradient"] == "naive"
    json.dumps(keras.saving.serialize_keras_object(layer))


class _MyGradient(tfaca.ACAGradient):
    """A user-defined strategy (a subclass of a built-in is not the built-in)."""


class _Ralston(tfaca.AbstractSolver):
    tableau = tfaca.ButcherTableau(c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
    order = 2
    error_order = None


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"method": _Ralston(), "step_size": 0.1}, "method"),
        ({"gradient": _MyGradient()}, "gradient"),
    ],
    ids=["user_solver", "user_gradient"],
)
def test_objects_that_a_config_cannot_hold_work_but_refuse_to_save(kwargs, argument):
    layer = tfaca.ODELayer(mlp_dynamics(), **kwargs)
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    expected = tfaca.odeint(lambda t, y: layer.dynamics(y), x, [0.0, 1.0], **kwargs)[-1]
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        layer.get_config()


@pytest.mark.parametrize("kwargs", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.slow_variants
def test_keras_file_round_trip(tmp_path, kwargs):
    x, _ = regression_data(n=BATCH)
    model = keras.Sequential(
        [keras.Input((STATE,)), keras.layers.Dense(STATE),
         tfaca.ODELayer(mlp_dynamics(name="dyn"), **kwargs), keras.layers.Flatten(),
         keras.layers.Dense(2)]
    )
    # Move the weights away from their initial values so loading has to restore them.
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, np.ones((len(x), 2), "float32"), epochs=1, verbose=0)
    expected = model(x).numpy()
    path = tmp_path / "model.keras"
    model.save(path)
    keras.backend.clear_session()
    keras.utils.set_random_seed(123)  # a fresh model would get other weights
    loaded = keras.models.load_model(path)
    ode = loaded.layers[1]
    assert isinstance(ode, tfaca.ODELayer)
    assert _json(ode.get_config()) == _json(model.layers[1].get_config())
    assert len(loaded.weights) == len(model.weights) > 0
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)


# --------------------------------------------------------------------------------------
# 6. SavedModel export, served without tfaca
# --------------------------------------------------------------------------------------

_SERVE = """
import json
import sys
sys.modules["tfaca"] = None  # any attempt to import tfaca fails
{block_keras}
try:
    import tfaca  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("tfaca is importable")
import numpy as np
import tensorflow as tf
for job in json.load(open(sys.argv[1])):
    served = tf.saved_model.load(job["dir"])
    inputs = [tf.constant(np.load(name)) for name in job["inputs"]]
    try:
        out = served.serve(inputs[0] if len(inputs) == 1 else inputs)
    except tf.errors.InvalidArgumentError as e:
        open(job["out"] + ".error", "w").write(str(e))
    else:
        np.save(job["out"], out.numpy())
loaded = {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
assert "tfaca" not in loaded, "tfaca was loaded"
"""


def _serve_elsewhere(tmp_path, jobs, block_keras=False):
    """Serves `[(export_dir, [inputs...]), ...]` in a fresh Python that cannot import
    tfaca (nor keras, if asked); returns each output, or the InvalidArgumentError text."""
    specs = []
    for k, (export_dir, inputs) in enumerate(jobs):
        names = []
        for n, x in enumerate(inputs):
            names.append(str(tmp_path / f"job{k}_in{n}.npy"))
            np.save(names[-1], x)
        specs.append({"dir": str(export_dir), "inputs": names, "out": str(tmp_path / f"job{k}_out.npy")})
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    script = _SERVE.format(block_keras='sys.modules["keras"] = None' if block_keras else "")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "jobs.json")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = []
    for spec in specs:
        if os.path.exists(spec["out"]):
            outputs.append(np.load(spec["out"]))
        else:
            with open(spec["out"] + ".error") as f:
                outputs.append(f.read())
    return outputs


def _export_model():
    x, y = regression_data(n=48)
    model = keras.Sequential(
        [keras.Input((STATE,)), keras.layers.Dense(STATE, activation="tanh"),
         tfaca.ODELayer(mlp_dynamics(), rtol=1e-4, atol=1e-6), keras.layers.Dense(3)]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, np.repeat(y, 3, axis=1), batch_size=BATCH, epochs=1, verbose=0)
    return model, x


def _export_times_model():
    state, times = keras.Input((STATE,)), keras.Input((len(IRREGULAR),))
    layer = tfaca.ODELayer(mlp_dynamics(), rtol=1e-4, atol=1e-6, return_sequences=True)
    return keras.Model([state, times], keras.layers.Flatten()(layer([state, times])))


def test_export_serves_without_tfaca(tmp_path):
    model, x = _export_model()
    export_dir = tmp_path / "served"
    model.export(str(export_dir), verbose=False)
    times_model = _export_times_model()
    times_dir = tmp_path / "served_times"
    times_model.export(str(times_dir), verbose=False)
    ts = np.tile(IRREGULAR, (12, 1))
    own_ts = ts.copy()
    own_ts[5, 3] += 0.01  # times per sample
    own_ts[7, 3:] = own_ts[7, 2]  # and padding
    bad_ts = ts.copy()
    bad_ts[5, 3] = bad_ts[5, 1]  # not increasing
    batches = [x[:20], x[20:27]]  # whole batches, of two sizes
    jobs = [(export_dir, [b]) for b in batches]
    jobs += [(times_dir, [x[:12], ts]), (times_dir, [x[:12], bad_ts]),
             (times_dir, [x[:12], own_ts])]
    served = _serve_elsewhere(tmp_path, jobs)
    for batch, out in zip(batches, served):
        assert isinstance(out, np.ndarray), out
        assert out.shape == (len(batch), 3)
        np.testing.assert_allclose(out, model(batch).numpy(), rtol=1e-5, atol=1e-5)
    assert isinstance(served[2], np.ndarray), served[2]
    assert served[2].shape == (12, len(IRREGULAR) * STATE)
    np.testing.assert_allclose(served[2], times_model([x[:12], ts]).numpy(), rtol=1e-5, atol=1e-5)
    # The served graph still checks the times, and reads each sample at its own.
    assert isinstance(served[3], str) and "`ts` of shape (batch, n)" in served[3]
    assert isinstance(served[4], np.ndarray), served[4]
    np.testing.assert_allclose(served[4], times_model([x[:12], own_ts]).numpy(), rtol=1e-5,
                               atol=1e-5)


def _exported_adjoint_model(tmp_path):
    """A model with an adjoint layer, exported, and its server. The adjoint's counters
    (tf.Variables its solves capture) were "untracked resources" to `model.export`."""
    x, y = regression_data(n=BATCH)
    ode = tfaca.ODELayer(mlp_dynamics(), gradient="adjoint", rtol=1e-4, atol=1e-6,
                         jit_compile=False)
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(1)])
    model.export(str(tmp_path / "served"), verbose=False)
    return model, tf.saved_model.load(str(tmp_path / "served")), x, y


def test_export_of_an_adjoint_layer_serves(tmp_path):
    model, served, x, _ = _exported_adjoint_model(tmp_path)
    np.testing.assert_allclose(served.serve(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_of_an_adjoint_layer_keeps_its_counters_for_training(tmp_path):
    model, _, x, y = _exported_adjoint_model(tmp_path)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    counters = model.layers[0].gradient_strategy.backward_stats
    assert int(counters.num_steps) > 0 and int(counters.num_fevals) > int(counters.num_steps)


@pytest.mark.slow  # test_export_serves_without_tfaca serves the same model in the suite
def test_export_serves_without_keras(tmp_path):
    """README: "serving needs TensorFlow only"."""
    model, x = _export_model()
    export_dir = tmp_path / "served"
    model.export(str(export_dir), verbose=False)
    (out,) = _serve_elsewhere(tmp_path, [(export_dir, [x[:10]])], block_keras=True)
    assert isinstance(out, np.ndarray), out
    np.testing.assert_allclose(out, model(x[:10]).numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# 7. XLA
# --------------------------------------------------------------------------------------


def _xla_pair_model(batchnorm, layer_jit="auto"):
    recorder = TrainingRecorder(HIDDEN)
    norm = [keras.layers.BatchNormalization(momentum=0.5)] if batchnorm else []
    dynamics = keras.Sequential([recorder, *norm, keras.layers.Dense(STATE)])
    model = keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(dynamics, max_steps=64, jit_compile=layer_jit),
         keras.layers.Dense(1)]
    )
    return model, recorder


@pytest.mark.parametrize(
    "batchnorm", [False, True], ids=["mlp", "batchnorm"]
)
@pytest.mark.slow
def test_jit_compile_trains_like_without_xla(batchnorm):
    """Same initial weights, same batches: XLA gives the same losses, weights (moving
    statistics included) and predictions."""
    x, y = regression_data(n=2 * BATCH)
    results = {}
    initial = None
    for jit in (False, True):
        # The reference runs no XLA at all: its solver loops not compiled either.
        model, recorder = _xla_pair_model(batchnorm, layer_jit="auto" if jit else False)
        if initial is None:
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit)
        assert model.jit_compile is jit
        recorder.xla.clear()  # the symbolic build of the dynamics
        losses = [
            model.train_on_batch(x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH],
                                 return_dict=True)["loss"]
            for k in range(2) for _ in range(2)
        ]
        # The dynamics were traced under XLA exactly when asked.
        assert recorder.xla and all(flag is jit for flag in recorder.xla), recorder.xla
        results[jit] = (losses, model.get_weights(), model.predict(x[:BATCH], verbose=0), model)
    (loss_ref, w_ref, _, reference), (loss_xla, w_xla, p_xla, _) = results[False], results[True]
    assert np.all(np.isfinite(loss_xla))
    assert loss_ref[-1] < loss_ref[0]
    np.testing.assert_allclose(loss_xla, loss_ref, rtol=1e-5)
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(w_ref, initial))  # it trained
    for a, b in zip(w_xla, w_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Compiled inference too, on the same weights (small weight differences can be
    # amplified by the moving statistics of a barely trained BatchNorm).
    reference.set_weights(w_xla)
    p_ref = reference.predict(x[:BATCH], verbose=0)
    np.testing.assert_allclose(p_xla, p_ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# 8. BatchNorm inside the dynamics
# --------------------------------------------------------------------------------------

BN_OPTIONS = dict(rtol=1e-6, atol=1e-8, first_step=0.5)  # rejects trial steps


def _bn_layer(gradient):
    bn = CountingBatchNorm(momentum=0.5)
    dynamics = keras.Sequential(
        [keras.layers.Dense(HIDDEN), bn, keras.layers.Activation("tanh"), keras.layers.Dense(STATE)]
    )
    layer = tfaca.ODELayer(dynamics, gradient=gradient, **BN_OPTIONS)
    x = tf.constant(np.random.default_rng(0).normal(size=(BATCH, STATE)).astype("float32"))
    layer.build(x.shape)
    return layer, bn, x


def _moving(bn):
    return [np.array(bn.moving_mean), np.array(bn.moving_variance)]


def _reference_stats(layer, bn, x):
    """Stats of the same solve in training mode; BatchNorm's state is put back after."""
    saved = _moving(bn)
    stats = tfaca.solve(lambda t, y: layer.dynamics(y, training=True), x, layer.t,
                        method=layer.method, **BN_OPTIONS).stats
    bn.moving_mean.assign(saved[0])
    bn.moving_variance.assign(saved[1])
    bn.training_calls = 0
    assert int(stats.num_rejected) > 0, "the setting must reject trial steps"
    return stats


def _changed(before, bn):
    return all(np.max(np.abs(a - b)) > 1e-6 for a, b in zip(_moving(bn), before))


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.slow_variants
def test_batchnorm_aca_forward_leaves_moving_statistics(mode):
    layer, bn, x = _bn_layer("aca")
    stats = _reference_stats(layer, bn, x)
    before = _moving(bn)
    forward = layer if mode == "eager" else tf.function(layer)
    out = forward(x, training=True)
    assert np.all(np.isfinite(out))
    for a, b in zip(_moving(bn), before):
        np.testing.assert_array_equal(a, b)
    if mode == "eager":
        # The forward evaluated the dynamics in training mode, rejected trials included.
        assert bn.training_calls == int(stats.num_fevals)

    # Under a tape without a gradient: unchanged too.
    with tf.GradientTape():
        forward(x, training=True)
    for a, b in zip(_moving(bn), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.slow_variants
def test_batchnorm_aca_gradient_updates_moving_statistics(mode):
    layer, bn, x = _bn_layer("aca")
    stats = _reference_stats(layer, bn, x)
    before = _moving(bn)

    def forward_backward(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, layer.trainable_variables)

    if mode == "eager":
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        bn.training_calls = 0
        grads = tape.gradient(loss, layer.trainable_variables)
        # The replay evaluates the dynamics once per stage of each accepted step
        # that the solution uses (dopri5: 6 of its 7), never for rejected trials.
        assert bn.training_calls == int(stats.num_steps) * tfaca.Dopri5.tableau.solution_stages
    else:
        grads = tf.function(forward_backward)(x)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    assert _changed(before, bn)


def test_batchnorm_naive_forward_updates_moving_statistics():
    layer, bn, x = _bn_layer("naive")
    stats = _reference_stats(layer, bn, x)
    before = _moving(bn)
    layer(x, training=True)
    assert _changed(before, bn)
    assert bn.training_calls == int(stats.num_fevals)  # rejected trials included


def test_batchnorm_inference_uses_and_keeps_moving_statistics():
    layer, bn, x = _bn_layer("aca")
    bn.moving_mean.assign(np.full(HIDDEN, 0.3, "float32"))
    before = _moving(bn)
    out = layer(x, training=False)
    for a, b in zip(_moving(bn), before):
        np.testing.assert_array_equal(a, b)
    assert bn.training_calls == 0
    np.testing.assert_allclose(
        out, odeint_dynamics(layer.dynamics, x, [0.0, 1.0], **BN_OPTIONS)[-1], rtol=1e-6, atol=1e-6
    )


@pytest.mark.slow
def test_batchnorm_fit_updates_moving_statistics():
    x, y = regression_data(n=32)
    layer, bn, _ = _bn_layer("aca")
    model = keras.Sequential([keras.Input((STATE,)), layer, keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    before = _moving(bn)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert _changed(before, bn)
    # predict does not touch them
    after_fit = _moving(bn)
    model.predict(x, verbose=0)
    for a, b in zip(_moving(bn), after_fit):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------
# 9. Solve metrics
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_and_evaluate_report_solve_metrics():
    x, y = regression_data()
    model = sequential_model()
    ode = ode_layer_of(model)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        validation_data=(x[:BATCH], y[:BATCH]))
    for prefix in ("", "val_"):
        fevals = np.array(history.history[f"{prefix}{ode.name}_fevals"])
        steps = np.array(history.history[f"{prefix}{ode.name}_steps"])
        assert fevals.shape == steps.shape == (2,)
        assert np.all(steps > 0) and np.all(fevals > steps)
        # dopri5, automatic first step: 2 + 6 x (accepted + rejected) per solve.
        assert np.all(fevals >= 2 + 6 * steps - 1e-4)

    # evaluate on one batch reports that batch's solve, as tfaca.solve counts it ...
    def counts(inputs):
        results = model.evaluate(inputs, y, batch_size=len(inputs), verbose=0, return_dict=True)
        return results[f"{ode.name}_steps"], results[f"{ode.name}_fevals"]

    def solve_counts(inputs):
        stats = tfaca.solve(lambda t, y_: ode.dynamics(y_), inputs, [0.0, 1.0]).stats
        return float(stats.num_steps), float(stats.num_fevals)

    zeros = np.zeros_like(x)  # a tiny automatic first step: more steps
    assert solve_counts(zeros) != solve_counts(x)
    first = counts(x)
    assert first == solve_counts(x)
    # ... and the means are reset between calls.
    assert counts(zeros) == solve_counts(zeros)
    assert counts(x) == first


@pytest.mark.slow
def test_metrics_of_two_ode_layers():
    x, y = regression_data(n=32)
    model = keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(mlp_dynamics(), name="ode_a"),
         tfaca.ODELayer(mlp_dynamics(), name="ode_b", method="bosh3"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse", jit_compile=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for name in ("ode_a", "ode_b"):
        assert history.history[f"{name}_steps"][0] > 0
        assert history.history[f"{name}_fevals"][0] > history.history[f"{name}_steps"][0]


# --------------------------------------------------------------------------------------
# 10. Mixed precision
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield keras.mixed_precision.global_policy()
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_mixed_precision_model_trains(mixed_policy):
    compute = tf.as_dtype(mixed_policy.compute_dtype)
    x, y = regression_data()
    # The dynamics layer itself does not autocast, so it sees the solver's own state
    # (a Sequential would cast it to the compute dtype first, as Keras should).
    recorder = TrainingRecorder(STATE, autocast=False)
    dynamics = recorder
    ode = tfaca.ODELayer(dynamics)
    model = keras.Sequential(
        [keras.Input((STATE,)), keras.layers.Dense(STATE), ode,
         keras.layers.Dense(1, dtype="float32")]
    )
    assert ode.compute_dtype == mixed_policy.compute_dtype
    out = ode(tf.constant(x[:BATCH]))
    assert out.dtype == compute
    assert tuple(out.shape) == (BATCH, STATE)
    # The solve runs in float32: the dynamics receive float32 states.
    assert recorder.dtypes and set(recorder.dtypes) == {tf.float32}, recorder.dtypes
    reference = tfaca.odeint(lambda t, y_: dynamics(y_), tf.cast(tf.cast(x[:BATCH], compute),
                             tf.float32), [0.0, 1.0])[-1]
    np.testing.assert_allclose(tf.cast(out, tf.float32), tf.cast(tf.cast(reference, compute),
                               tf.float32), rtol=1e-2, atol=1e-2)

    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert set(recorder.dtypes) == {tf.float32}


def _drift_model(dtype=None):
    """`[state, times] -> states` for y1' = y2, y2' = 0: y1(t) = y1(0) + t y2(0), which
    every Runge-Kutta step solves exactly. Started at y1 = -t_k, the output crosses zero
    near t_k, where its rounding is fine and an error in the time is not hidden."""
    dynamics = keras.layers.Dense(
        2, use_bias=False, dtype="float32",
        kernel_initializer=keras.initializers.Constant([[0.0, 0.0], [1.0, 0.0]]))
    state, times = keras.Input((2,)), keras.Input((4,))
    ode = tfaca.ODELayer(dynamics, return_sequences=True, dtype=dtype)
    return keras.Model([state, times], ode([state, times]))


def test_mixed_precision_keeps_the_times_precision(mixed_policy):
    # float16 rounds 41.7 to 41.6875 and 1000.1 and 1000.2 to 1000 (refused: a repeat
    # before a later time); bfloat16 rounds 59.9 to 60 and all three to 1000 (taken as
    # padding). The times must reach the solve as given.
    state = np.array([[-41.5, 1.0], [-1000.0, 1.0]], "float32")
    times = np.array([[0.0, 41.7, 59.9, 60.0], [0.0, 1000.1, 1000.2, 1001.0]], "float32")
    reference = _drift_model(dtype="float32")([state, times])
    out = _drift_model()([state, times])
    compute = tf.as_dtype(mixed_policy.compute_dtype)
    assert out.dtype == compute
    # To the output's own rounding; a time rounded by float16 errs by 6 %, by bfloat16 by 25 %.
    np.testing.assert_allclose(tf.cast(out, tf.float32), reference,
                               rtol=float(np.finfo(compute.as_numpy_dtype).eps))
    # float32 times near 1000 are 6e-5 apart: the float32 solve is that close.
    np.testing.assert_allclose(reference[:, 1:, 0], [[0.2, 18.4, 18.5], [0.1, 0.2, 1.0]],
                               atol=1e-3)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_solve_of_a_low_precision_state_computes_in_float32(dtype):
    seen = []

    def func(t, y):
        seen.append((y.dtype, t.dtype))
        return -y

    y0 = tf.constant([[1.0, 2.0]], dtype)
    sol = tfaca.solve(func, y0, [0.0, 1.0], rtol=1e-6, atol=1e-8)
    assert sol.ys.dtype == dtype
    assert set(seen) == {(tf.float32, tf.float32)}
    # float16 stepping would need many more steps and lose the 1e-6 accuracy.
    np.testing.assert_allclose(tf.cast(sol.ys[-1], tf.float32), np.exp(-1.0) * np.array([[1.0, 2.0]]),
                               rtol=1e-2)


# --------------------------------------------------------------------------------------
# 11. Bad arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        (dict(dynamics=lambda y: -y), TypeError, "dynamics"),
        (dict(dynamics="dense"), TypeError, "dynamics"),
        (dict(t=(0.0,)), ValueError, "t"),
        (dict(t=(1.0,)), ValueError, "t"),
        (dict(t=(0.0, 1.0, 0.5)), ValueError, "t"),
        (dict(t=(0.0, 0.0)), ValueError, "t"),
        (dict(t=("a", "b")), ValueError, "t"),
        (dict(t=1.0), ValueError, "t"),
        (dict(method="rk99"), ValueError, "method"),
        (dict(gradient="adjoint_magic"), ValueError, "gradient"),
        (dict(rtol=0.0), ValueError, "rtol"),
        (dict(rtol=-1e-3), ValueError, "rtol"),
        (dict(rtol=float("nan")), ValueError, "rtol"),
        (dict(atol=-1.0), ValueError, "atol"),
        (dict(method="rk4"), ValueError, "step_size"),
        (dict(method="euler", step_size=None), ValueError, "step_size"),
        (dict(method="rk4", step_size=0.0), ValueError, "step_size"),
        (dict(first_step=-0.1), ValueError, "first_step"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(max_steps=2.5), ValueError, "max_steps"),
        (dict(max_step=0.0), ValueError, "max_step"),
        (dict(max_step=-0.5), ValueError, "max_step"),
        (dict(safety=0.0), ValueError, "safety"),
        (dict(safety=1.5), ValueError, "safety"),
        (dict(factor_min=0.0), ValueError, "factor_min"),
        (dict(factor_min=2.0), ValueError, "factor_min"),
        (dict(factor_max=0.5), ValueError, "factor_max"),
        (dict(throw="no"), TypeError, "throw"),
        (dict(throw=None), TypeError, "throw"),
        (dict(jit_compile="yes"), ValueError, "jit_compile"),
        (dict(jit_compile=None), ValueError, "jit_compile"),
        (dict(jit_compile=True, gradient="naive"), ValueError, "jit_compile=True"),
    ],
)
def test_bad_arguments(kwargs, error, argument):
    kwargs = dict(kwargs)
    dynamics = kwargs.pop("dynamics", None) or mlp_dynamics()
    with pytest.raises(error, match=f"`{argument}`"):
        tfaca.ODELayer(dynamics, **kwargs)


def test_bad_number_of_inputs():
    layer = tfaca.ODELayer(mlp_dynamics())
    x = np.ones((2, STATE), "float32")
    with pytest.raises(ValueError, match="`inputs`"):
        layer([x, np.array([0.0, 1.0], "float32"), x])
