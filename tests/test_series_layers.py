"""Keras layers for observed series: `CDELayer`, `ODELayer(control=...)` and `ODERNNCell`
against the functional API they are built on, padding and masks, exact gradients, and
the three in `fit`, `.keras` files, SavedModels served without tfaca and mixed precision
(MirroredStrategy: tests/test_distribute.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import relative_error
from test_layers_saving import _serve_elsewhere

pytestmark = pytest.mark.usefixtures("keras_seed")

BATCH, N, CHANNELS, UNITS = 6, 8, 2, 4
PATHS = {"cubic": tfaca.CubicPath, "linear": tfaca.LinearPath, "hermite": tfaca.HermitePath,
         "rectilinear": tfaca.RectilinearPath}


def irregular_series(batch=BATCH, n=N, channels=CHANNELS, seed=0, dtype="float32"):
    """Times `(batch, n)` per series from 0 (row 1 padded after 5 observations) and values
    `(batch, n, channels)` with a few missing (NaN)."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.05, 3.0, (batch, n)), axis=1)
    times[:, 0] = 0.0
    times[1, 5:] = times[1, 4]
    values = rng.normal(size=(batch, n, channels))
    values[2, 3, 0] = values[4, 1, 1] = np.nan
    return times.astype(dtype), values.astype(dtype)


def field(units=UNITS, channels=CHANNELS + 1, dtype=None):
    return keras.Sequential([keras.layers.Dense(16, activation="softplus", dtype=dtype),
                             keras.layers.Dense(units * channels, activation="tanh",
                                                dtype=dtype)])


def mlp(out, dtype=None):
    return keras.Sequential([keras.layers.Dense(16, activation="tanh", dtype=dtype),
                             keras.layers.Dense(out, dtype=dtype)])


# --------------------------------------------------------------------------------------
# Each layer is the functional API it is built on.


@pytest.mark.parametrize("path", ["cubic", "linear", "hermite", "rectilinear"])
@pytest.mark.slow_variants
def test_cde_layer_is_cdeint_of_its_vector_field(path):
    times, values = irregular_series(dtype="float64")
    channels = CHANNELS + 1
    layer = tfaca.CDELayer(field(dtype="float64"), UNITS, path=path, return_sequences=True,
                           rtol=1e-7, atol=1e-9, jit_compile=False, dtype="float64")

    @tf.function
    def both():
        out = layer([times, values])
        # The same by hand: time as the first channel, z0 = initial(X(t0)).
        stamped = np.concatenate([times[:, :, None], values], axis=2)
        x = PATHS[path](times, values if path == "rectilinear" else stamped)
        ts = x.observation_times if path == "rectilinear" else times
        z0 = layer.initial(x.evaluate(ts[0] if path == "rectilinear" else times[:, 0]))
        fn = lambda t, z: tf.reshape(layer.vector_field(z), [-1, UNITS, channels])  # noqa: E731
        return out, tfaca.cdeint(fn, z0, x, ts, rtol=1e-7, atol=1e-9, per_sample=True,
                                 jit_compile=False)

    out, ys = (v.numpy() for v in both())
    assert out.shape == (BATCH, N, UNITS)
    np.testing.assert_allclose(out, np.moveaxis(ys, 0, 1), rtol=1e-12, atol=1e-12)
    # The padded row holds its last real state.
    np.testing.assert_allclose(out[1, 5:], np.repeat(out[1, 4:5], N - 5, 0), atol=1e-12)


def test_cde_layer_padding_mask_and_nan_and_each_series_alone():
    times, values = irregular_series(dtype="float64")
    layer = tfaca.CDELayer(field(dtype="float64"), UNITS, rtol=1e-8, atol=1e-10,
                           jit_compile=False, dtype="float64")
    mask = np.isfinite(values)
    filled = np.where(mask, values, 123.0)

    @tf.function
    def outputs():
        alone = [layer([times[b:b + 1, :n], values[b:b + 1, :n]]) for b, n in ((1, 5), (4, N))]
        return layer([times, values]), layer([times, filled, mask]), alone

    out, masked, (alone1, alone4) = outputs()
    # A mask instead of NaN: the masked entries' values do not matter.
    np.testing.assert_allclose(masked.numpy(), out.numpy(), rtol=1e-12)
    # Each series alone, without its padding, gives its row (per-sample steps).
    np.testing.assert_allclose(alone1.numpy()[0], out.numpy()[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(alone4.numpy()[0], out.numpy()[4], rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_cde_layer_gradients_equal_backprop_through_the_same_steps():
    """ACA through the layer = backpropagation through the same (fixed) steps, for the
    weights of the field and of the initial layer and for the values (float64)."""
    times, values = irregular_series(dtype="float64")
    values = np.nan_to_num(values)
    grads = {}
    for mode in ("aca", "naive"):
        keras.utils.set_random_seed(3)
        layer = tfaca.CDELayer(field(dtype="float64"), UNITS, path="linear", gradient=mode,
                               step_size=0.2, method="rk4", jit_compile=False, dtype="float64")

        @tf.function
        def gradients():
            v = tf.constant(values)
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(layer([times, v]) ** 2)
            return tape.gradient(loss, [v] + layer.trainable_weights)

        grads[mode] = gradients()
    assert len(grads["aca"]) == 1 + 6  # values, initial Dense, two Dense of the field
    for a, b in zip(grads["aca"], grads["naive"]):
        assert relative_error(a.numpy(), b.numpy()) < 1e-12


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.slow_variants
def test_ode_layer_with_a_control_is_odeint_with_the_input(keyword):
    times, values = irregular_series(dtype="float64")
    rng = np.random.default_rng(4)
    y0 = rng.normal(size=(BATCH, 3))
    net = mlp(3, dtype="float64")

    class Driven(keras.layers.Layer):
        def call(self, y, u):
            return net(tf.concat([y, u], axis=-1))

    dynamics = Driven(dtype="float64") if keyword else net
    layer = tfaca.ODELayer(dynamics, control="hermite", return_sequences=True, rtol=1e-7,
                           atol=1e-9, per_sample=True, jit_compile=False, dtype="float64")

    @tf.function
    def both():
        ys = tfaca.odeint(lambda t, y, u: net(tf.concat([y, u], axis=-1)), tf.constant(y0),
                          times, control=tfaca.HermitePath(times, values), rtol=1e-7,
                          atol=1e-9, per_sample=True, jit_compile=False)
        return layer([y0, times, values]), ys

    out, ys = (v.numpy() for v in both())
    np.testing.assert_allclose(out, np.moveaxis(ys, 0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_ode_rnn_cell_evolves_then_updates_at_each_observation():
    """`keras.layers.RNN(ODERNNCell)`: between observations an ODE over the elapsed time,
    at each a GRU update; masked (padded) steps carry the state."""
    n = 6
    times, values = irregular_series(n=n, dtype="float64")
    values = np.nan_to_num(values)
    inputs = np.concatenate([times[:, :, None] + 1.0, values], axis=2)  # times from 1
    mask = np.ones((BATCH, n), bool)
    mask[1, 5:] = False
    cell = tfaca.ODERNNCell(UNITS, rtol=1e-8, atol=1e-10, jit_compile=False, dtype="float64")
    rnn = keras.layers.RNN(cell, return_sequences=True, dtype="float64")
    last_only = keras.layers.RNN(cell, dtype="float64")

    @tf.function
    def by_hand():
        h = tf.zeros((BATCH, UNITS), tf.float64)
        last = inputs[:, 0, 0]
        states = []
        for k in range(n):
            gap = inputs[:, k, 0] - last
            ts = tf.constant(np.stack([np.zeros(BATCH), gap], axis=1))
            evolved = tfaca.odeint(lambda t, y: cell.dynamics(y), h, ts, rtol=1e-8, atol=1e-10,
                                   jit_compile=False)[-1]
            updated = cell.gru(tf.constant(values[:, k]), [evolved])[0]
            h = tf.where(mask[:, k:k + 1], updated, h)
            last = np.where(mask[:, k], inputs[:, k, 0], last)
            states.append(h)
        return rnn(inputs, mask=mask), last_only(inputs, mask=mask), tf.stack(states, 1)

    out, final, expected = (v.numpy() for v in by_hand())
    np.testing.assert_allclose(out[mask], expected[mask], rtol=1e-12, atol=1e-12)
    # The padded series ends with its last observation's state.
    np.testing.assert_allclose(final[1], out[1, 4], atol=1e-12)


@pytest.mark.parametrize("path, include_time, count, channels", [
    ("cubic", True, True, 2 * (CHANNELS + 1)), ("linear", False, True, 2 * CHANNELS),
    ("hermite", False, False, CHANNELS), ("rectilinear", False, True, 2 * CHANNELS + 1)])
def test_cde_layer_path_channels(path, include_time, count, channels):
    """The path's channels, as `vector_field` must shape its matrix: a call in a graph runs
    and the initial layer reads that many."""
    times, values = irregular_series()
    layer = tfaca.CDELayer(field(channels=channels), UNITS, path=path,
                           include_time=include_time, observed_count=count, step_size=0.5,
                           method="euler", jit_compile=False)
    out = tf.function(lambda: layer([times, values]))()
    assert out.shape == (BATCH, UNITS) and np.all(np.isfinite(out.numpy()))
    assert layer.initial.kernel.shape == (channels, UNITS)


def test_bad_series_inputs_and_options_are_named():
    times, values = irregular_series()
    with pytest.raises(ValueError, match=r"\[times, values\] or \[times, values, mask\]"):
        tfaca.CDELayer(field(), UNITS)(values)
    with pytest.raises(ValueError, match="units x channels = 4 x 3 = 12"):
        tfaca.CDELayer(field(channels=2), UNITS)([times, values])
    with pytest.raises(ValueError, match="`path` must be one of"):
        tfaca.CDELayer(field(), UNITS, path="spline")
    with pytest.raises(ValueError, match="`units` must be a positive integer"):
        tfaca.ODERNNCell(0)
    with pytest.raises(ValueError, match=r"\[state, times, values\]"):
        tfaca.ODELayer(mlp(3), control="linear")([np.zeros((BATCH, 3), "float32"), times])
    with pytest.raises(ValueError, match="`control` must be one of 'linear', 'hermite', "
                                         "'cubic'. Received: control='rectilinear'"):
        tfaca.ODELayer(mlp(3), control="rectilinear")


# --------------------------------------------------------------------------------------
# fit, .keras, export served without tfaca, mixed precision.


def series_models(dtype="float64"):
    """The three layers in small classifiers of `[times, values]`: a neural CDE, an ODE
    driven by the interpolated series from a Dense of its first observation, an ODE-RNN.
    Float64 at tight tolerances, or float16 compute at loose ones."""
    tol = dict(rtol=1e-6, atol=1e-8) if dtype == "float64" else dict(rtol=1e-3, atol=1e-5)
    times, values = keras.Input((N,)), keras.Input((N, CHANNELS))
    cde = tfaca.CDELayer(field(dtype=dtype), UNITS, name="cde", dtype=dtype,
                         **tol)([times, values])
    first = keras.layers.Flatten()(keras.layers.Cropping1D((0, N - 1))(values))
    start = keras.layers.Dense(3, dtype=dtype)(first)
    driven = tfaca.ODELayer(mlp(3, dtype=dtype), control="linear", per_sample=True,
                            jit_compile=False, name="driven", dtype=dtype,
                            **tol)([start, times, values])
    steps = keras.layers.Concatenate()([keras.layers.Reshape((N, 1))(times), values])
    rnn = keras.layers.RNN(tfaca.ODERNNCell(UNITS, jit_compile=False, dtype=dtype, **tol),
                           dtype=dtype)(steps)
    models = {}
    for name, h in (("cde", cde), ("driven", driven), ("odernn", rnn)):
        logits = keras.layers.Dense(2, dtype=dtype)(h)
        models[name] = keras.Model([times, values], logits, name=name)
        models[name].compile(keras.optimizers.Adam(1e-2),
                             keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return models


def classification_data(seed=0):
    times, values = irregular_series(batch=16, seed=seed)
    values = np.nan_to_num(values)
    labels = (values[:, :, 0].mean(axis=1) > 0).astype("int32")
    return [times, values], labels


@pytest.mark.parametrize("names", [("cde",), ("driven", "odernn")], ids=["cde", "others"])
@pytest.mark.slow  # 45-80 s each on 2 cores: the quick suite's budget
def test_series_models_fit_round_trip_and_serve_without_tfaca(tmp_path, names):
    """The models fitted one epoch (two steps) in Keras' default mode (the CDE's loops
    compiled as `jit_compile="auto"` does, the others' not), saved as .keras files and
    loaded back, exported and served by a Python without tfaca (one server for the
    models of a case)."""
    x, y = classification_data()
    models = {name: model for name, model in series_models().items() if name in names}
    predicted, jobs = {}, []
    for name, model in models.items():
        before = model.get_weights()
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
        assert np.all(np.isfinite(history["loss"])), history
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())
        assert max(np.abs(a - b).max() for a, b in zip(model.get_weights(), before)) > 1e-3
        predicted[name] = model.predict(x, verbose=0)
        model.save(tmp_path / f"{name}.keras")
        loaded = keras.models.load_model(tmp_path / f"{name}.keras")
        for a, b in zip(loaded.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), predicted[name], rtol=1e-9,
                                   atol=1e-9)
        model.export(str(tmp_path / name), verbose=False)
        jobs.append((tmp_path / name, x))
    for name, got in zip(models, _serve_elsewhere(tmp_path, jobs)):
        assert isinstance(got, np.ndarray), (name, got)
        np.testing.assert_allclose(got, predicted[name], rtol=1e-7, atol=1e-7)


@pytest.mark.slow
def test_series_models_train_under_mixed_precision():
    x, y = classification_data()
    for name, model in series_models(dtype="mixed_float16").items():
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
        assert np.all(np.isfinite(history["loss"])), name
        assert model.layers[-1].compute_dtype == "float16"
        assert model(x).dtype == "float16"
