"""`tfaca.ODELayer` in Keras (`tfaca._layers`): models of every kind train, the dynamics
see `t` and `training`, vector and image states, times as a second input, the solve and
failure metrics, one gradient strategy per layer, bad arguments. Saving is in
`test_layers_saving.py`; Keras features inside the dynamics (XLA, BatchNorm, dropout,
losses, mixed precision) in `test_layers_training.py`."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    BATCH, IRREGULAR, SMALL_BATCH, STATE, mlp_dynamics, odeint_dynamics, regression_data,
    states, TrainingRecorder,
)

# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


# --------------------------------------------------------------------------------------
# Sequential, functional and subclassed models
# --------------------------------------------------------------------------------------


def sequential_model():
    return keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(mlp_dynamics()), keras.layers.Dense(1)]
    )


def functional_model():
    inputs = keras.Input((STATE,))
    h = keras.layers.Dense(STATE, activation="tanh")(inputs)
    h = tfaca.ODELayer(mlp_dynamics())(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


class ODEModel(keras.Model):
    """A subclassed model: Dense -> ODELayer -> Dense."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(STATE, activation="tanh")
        self.ode = tfaca.ODELayer(mlp_dynamics())
        self.head = keras.layers.Dense(1)

    def call(self, x, training=None):
        return self.head(self.ode(self.encoder(x), training=training))


def subclassed_model():
    model = ODEModel()
    model(np.zeros((1, STATE), "float32"))  # build
    return model


def ode_layer_of(model):
    layers = [layer for layer in model.layers if isinstance(layer, tfaca.ODELayer)]
    assert len(layers) == 1
    return layers[0]


def weights_of(layer):
    return [np.array(w) for w in layer.get_weights()]


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
# The dynamics see the current time and the training flag
# --------------------------------------------------------------------------------------


class TimeScaled(keras.layers.Layer):
    """dy/dt = t * y; records every `t` it receives (eagerly, as floats)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.times = []

    def call(self, y, t):
        if hasattr(t, "numpy"):
            self.times.append((tuple(t.shape), float(t)))
        return y * tf.cast(t, y.dtype)


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
# Vector states and NHWC feature maps
# --------------------------------------------------------------------------------------


def _vector_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, STATE)).astype("float32")
    labels = rng.integers(0, 2, size=BATCH).astype("int32")
    ode = tfaca.ODELayer(mlp_dynamics())
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(2)])
    return model, ode, x, labels, (BATCH, STATE)


def conv_dynamics(channels, hidden=8):
    return keras.Sequential(
        [
            keras.layers.Conv2D(hidden, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(channels, 3, padding="same"),
        ]
    )


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
# Times as a second input (irregular series)
# --------------------------------------------------------------------------------------


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
    times per sample are `test_per_sample.py`'s."""
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
            # Keras compiles `predict` with XLA on a GPU ("auto"), where nothing raises
            # (the test below): here the uncompiled graph, as on a CPU.
            model.compile(jit_compile=False)
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
# Solve metrics
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
# The failure metric
# --------------------------------------------------------------------------------------


FAILING = dict(rtol=1e-9, atol=1e-9, max_steps=3)


@pytest.mark.parametrize(
    "options, jit_compile, failures",
    [
        (FAILING, True, 1.0),
        (dict(FAILING, throw=False), False, 1.0),
        ({}, True, 0.0),
        (dict(throw=False), False, 0.0),
    ],
    ids=["failing_xla", "failing_no_throw", "healthy_xla", "healthy_no_throw"],
)
@pytest.mark.slow_variants
def test_fit_and_evaluate_report_failures(options, jit_compile, failures):
    ode = tfaca.ODELayer(mlp_dynamics(), name="ode", **options)
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(1)])
    model.compile("sgd", "mse", jit_compile=jit_compile)
    x, y = states(32), np.zeros((32, 1), "float32")
    history = model.fit(x, y, batch_size=SMALL_BATCH, epochs=2, verbose=0)
    assert history.history["ode_failures"] == [failures, failures]
    assert np.all(np.isfinite(history.history["loss"])) == (failures == 0.0)
    results = model.evaluate(x, y, batch_size=SMALL_BATCH, verbose=0, return_dict=True)
    assert results["ode_failures"] == failures


def test_failures_metric_is_the_fraction_of_failed_solves():
    # Four fixed steps reach t=1, two reach t=0.5; three are allowed.
    layer = tfaca.ODELayer(mlp_dynamics(), method="rk4", step_size=0.25, max_steps=3,
                           throw=False)
    x = states()
    out = layer([x, tf.constant([0.0, 1.0])])
    assert np.all(np.isnan(out))  # and no exception: throw=False
    assert float(layer.failures_tracker.result()) == 1.0
    for _ in range(2):
        assert np.all(np.isfinite(layer([x, tf.constant([0.0, 0.5])])))
    assert float(layer.failures_tracker.result()) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------
# One gradient strategy per layer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["name", "class", "instance"])
@pytest.mark.slow_variants
def test_gradient_strategy_is_built_once_and_shared_by_every_solve(given):
    strategy = tfaca.AdjointGradient()
    gradient = {"name": "adjoint", "class": tfaca.AdjointGradient, "instance": strategy}[given]
    layer = tfaca.ODELayer(mlp_dynamics(), gradient=gradient)
    assert isinstance(layer.gradient_strategy, tfaca.AdjointGradient)
    if given == "instance":
        assert layer.gradient_strategy is strategy
    assert layer.get_config()["gradient"] == "adjoint"
    with pytest.raises(AttributeError):
        layer.gradient_strategy = tfaca.AdjointGradient()
    first = layer.gradient_strategy
    x = states()
    for _ in range(2):
        first.backward_stats.num_steps.assign(0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        tape.gradient(loss, layer.trainable_variables)
        # The adjoint's reverse solve recorded its cost on the layer's instance.
        assert layer.gradient_strategy is first
        assert int(first.backward_stats.num_steps) > 0


@pytest.mark.slow
def test_adjoint_counters_read_through_the_layer_after_fit():
    """After `fit` (a graph), the layer's adjoint holds the last reverse solve's counts."""
    layer = tfaca.ODELayer(mlp_dynamics(), gradient="adjoint")
    model = keras.Sequential([keras.Input((STATE,)), layer, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = states()
    model.fit(x, np.zeros((len(x), 1), "float32"), epochs=1, verbose=0)
    stats = layer.gradient_strategy.backward_stats
    assert int(stats.num_steps) > 0 and int(stats.num_fevals) > int(stats.num_steps)


# --------------------------------------------------------------------------------------
# Bad arguments
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
