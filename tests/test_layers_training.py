"""Training an `ODELayer` where Keras features meet the solver: XLA, BatchNorm inside the
dynamics, randomness in the dynamics (one draw per call, exact gradients), losses added
inside the dynamics (refused) and weight regularizers (kept), and mixed precision."""

import keras
import ml_dtypes  # NumPy's finfo knows no bfloat16 (NumPy 2.5)
import numpy as np
import pytest
import tensorflow as tf

import tfaca
from helpers import (
    BATCH, HIDDEN, SMALL_BATCH, STATE, mlp_dynamics, odeint_dynamics, regression_data, states,
    TrainingRecorder,
)

# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


# --------------------------------------------------------------------------------------
# XLA
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
    # float32, and XLA fuses and orders the arithmetic its own way: four SGD steps of
    # rate 0.1 carry the rounding on (2.6e-5 relative at the fourth loss with BatchNorm on
    # an AVX-512 CPU; under 1e-5 on others).
    np.testing.assert_allclose(loss_xla, loss_ref, rtol=1e-4)
    assert any(np.max(np.abs(a - b)) > 1e-3 for a, b in zip(w_ref, initial))  # it trained
    for a, b in zip(w_xla, w_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Compiled inference too, on the same weights (small weight differences can be
    # amplified by the moving statistics of a barely trained BatchNorm).
    reference.set_weights(w_xla)
    p_ref = reference.predict(x[:BATCH], verbose=0)
    np.testing.assert_allclose(p_xla, p_ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# BatchNorm inside the dynamics
# --------------------------------------------------------------------------------------


class CountingBatchNorm(keras.layers.BatchNormalization):
    """BatchNormalization that counts (eagerly) the calls made in training mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.training_calls = 0

    def call(self, inputs, training=None, mask=None):
        if training:
            self.training_calls += 1
        return super().call(inputs, training=training, mask=mask)


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


def _changed(before, bn):
    return all(np.max(np.abs(a - b)) > 1e-6 for a, b in zip(_moving(bn), before))


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
# Randomness in the dynamics: one draw per call
# --------------------------------------------------------------------------------------


RATE = 0.5  # dropout scale 1 / (1 - RATE) = 2 is exact: fixed-mask references match bit for bit


def dropout_dynamics():
    """Dense -> Dropout -> Dense, built for `(SMALL_BATCH, STATE)` states."""
    dynamics = keras.Sequential(
        [
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dropout(RATE, seed=7),
            keras.layers.Dense(STATE),
        ]
    )
    dynamics.build((None, STATE))
    return dynamics


def generator_state(dynamics):
    return dynamics.layers[1].seed_generator.state.numpy()


def fixed_mask_field(dynamics, state, jit_compile=False):
    """The field the Dropout dynamics compute when their generator stands at `state`,
    with that mask held fixed, as `func(t, y)` for `tfaca.odeint`. Leaves the generator
    where it was. Under XLA the same seed draws another mask (TensorFlow's stateless
    random ops select their algorithm per device), so `jit_compile` draws it there."""
    dense_in, dropout, dense_out = dynamics.layers
    generator = dropout.seed_generator
    saved = generator.state.numpy()
    generator.state.assign(state)
    draw = tf.function(lambda: dropout(tf.ones((SMALL_BATCH, HIDDEN)), training=True),
                       jit_compile=jit_compile)
    mask = draw()  # 0 or 1 / (1 - RATE)
    generator.state.assign(saved)
    assert 0 < np.mean(np.asarray(mask) == 0) < 1
    return lambda t, y: dense_out(dense_in(y) * mask)


def loss_and_grads(fn, x, variables):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = fn(x)
        loss = tf.reduce_sum(out**2)
    return out, tape.gradient(loss, [x] + list(variables))


def assert_all_close(actual, expected, rtol):
    for k, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        scale = np.max(np.abs(e))
        assert scale > 0, k
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=f"entry {k}")


ADAPTIVE = dict(rtol=1e-5, atol=1e-6, first_step=0.5)  # rejects trial steps


@pytest.mark.parametrize("gradient", ["aca", "adjoint", "naive"])
@pytest.mark.slow_variants
def test_dropout_in_training_is_one_fixed_mask_with_its_exact_gradient(gradient):
    """In training, the layer computes the field with one dropout mask, and each gradient
    mode gives what it gives on that field with the mask held fixed: for ACA, the exact
    gradient of the computed output."""
    dynamics = dropout_dynamics()
    layer = tfaca.ODELayer(dynamics, gradient=gradient, **ADAPTIVE)
    x = states()
    field = fixed_mask_field(dynamics, generator_state(dynamics))
    variables = dynamics.trainable_variables
    out, grads = loss_and_grads(lambda x: layer(x, training=True), x, variables)
    sol = tfaca.solve(field, x, [0.0, 1.0], gradient=gradient, **ADAPTIVE)
    assert int(sol.stats.num_rejected) > 0, "the setting must reject trial steps"
    ref_out, ref_grads = loss_and_grads(
        lambda x: tfaca.odeint(field, x, [0.0, 1.0], gradient=gradient, **ADAPTIVE)[-1],
        x, variables,
    )
    np.testing.assert_array_equal(out, ref_out)
    assert_all_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.slow_variants
def test_dropout_aca_gradient_equals_backprop_at_fixed_steps(mode):
    """At fixed steps the naive gradient is backprop through the computation the layer
    made, with nothing else to differentiate: ACA must agree to rounding, with the
    mask drawn by the layer itself."""
    dynamics = dropout_dynamics()
    fixed = dict(method="rk4", step_size=0.125)
    # Not compiled (in a graph "auto" would compile ACA's loops): XLA draws other numbers
    # from the same seed than TensorFlow's kernels, and naive is never compiled on its
    # own, so both must draw with TensorFlow's for one mask.
    aca = tfaca.ODELayer(dynamics, gradient="aca", jit_compile=False, **fixed)
    naive = tfaca.ODELayer(dynamics, gradient="naive", **fixed)
    x = states()
    start = generator_state(dynamics)
    results = []
    for layer in (aca, naive):
        dynamics.layers[1].seed_generator.state.assign(start)
        fn = lambda x, layer=layer: loss_and_grads(  # noqa: E731
            lambda x: layer(x, training=True), x, dynamics.trainable_variables
        )
        results.append(fn(x) if mode == "eager" else tf.function(fn)(x))
    (out_aca, g_aca), (out_naive, g_naive) = results
    np.testing.assert_allclose(out_aca, out_naive, rtol=1e-6, atol=1e-6)
    assert_all_close(g_aca, g_naive, rtol=1e-5)
    # And it is the dropout field, not the inference one.
    reference = tfaca.odeint(fixed_mask_field(dynamics, start), x, [0.0, 1.0], **fixed)[-1]
    np.testing.assert_allclose(out_aca, reference, rtol=1e-6, atol=1e-6)


def _random_case(kind):
    """A dynamics with a random layer, its state, and the layer's generator."""
    if kind == "spatial_dropout":
        random_layer = keras.layers.SpatialDropout2D(0.3, seed=3)
        dynamics = keras.Sequential(
            [keras.layers.Conv2D(6, 3, padding="same", activation="tanh"), random_layer,
             keras.layers.Conv2D(2, 3, padding="same")]
        )
        x = np.random.default_rng(0).normal(size=(4, 5, 5, 2)).astype("float32")
    else:
        random_layer = {
            "dropout": keras.layers.Dropout(0.3, seed=3),
            "gaussian_noise": keras.layers.GaussianNoise(0.5, seed=3),
            "gaussian_dropout": keras.layers.GaussianDropout(0.3, seed=3),
        }[kind]
        dynamics = keras.Sequential(
            [keras.layers.Dense(HIDDEN, activation="tanh"), random_layer,
             keras.layers.Dense(STATE)]
        )
        x = np.asarray(states())
    dynamics.build(x.shape)
    return dynamics, tf.constant(x), random_layer.seed_generator


@pytest.mark.parametrize(
    "kind", ["dropout", "gaussian_noise", "gaussian_dropout", "spatial_dropout"]
)
@pytest.mark.slow_variants
def test_random_layers_aca_agrees_with_naive_at_fixed_steps(kind):
    dynamics, x, generator = _random_case(kind)
    fixed = dict(method="rk4", step_size=0.25)
    start = generator.state.numpy()
    results = []
    for gradient in ("aca", "naive"):
        layer = tfaca.ODELayer(dynamics, gradient=gradient, **fixed)
        generator.state.assign(start)
        results.append(
            loss_and_grads(lambda x: layer(x, training=True), x, dynamics.trainable_variables)
        )
    (out_aca, g_aca), (out_naive, g_naive) = results
    np.testing.assert_allclose(out_aca, out_naive, rtol=1e-6, atol=1e-6)
    assert_all_close(g_aca, g_naive, rtol=1e-5)
    # The layer did draw: training differs from inference.
    assert np.max(np.abs(out_aca - layer(x, training=False))) > 1e-3


def test_consecutive_training_calls_draw_new_masks():
    dynamics = dropout_dynamics()
    layer = tfaca.ODELayer(dynamics, **ADAPTIVE)
    generator = dynamics.layers[1].seed_generator
    x = states()
    outputs = []
    for call in range(3):
        start = generator_state(dynamics)
        if call == 1:  # a call with its gradient: the replay must not rewind the draws
            out, _ = loss_and_grads(lambda x: layer(x, training=True), x,
                                    dynamics.trainable_variables)
        else:
            out = layer(x, training=True)
        reference = tfaca.odeint(fixed_mask_field(dynamics, start), x, [0.0, 1.0],
                                 **ADAPTIVE)[-1]
        np.testing.assert_array_equal(out, reference)
        # One call advances the generator as one call of the dynamics does: one draw.
        np.testing.assert_array_equal(generator.state.numpy(), start + [0, 1])
        outputs.append(np.asarray(out))
    for a in range(3):
        for b in range(a):
            assert np.max(np.abs(outputs[a] - outputs[b])) > 1e-3, (a, b)


def test_two_calls_on_one_tape_leave_the_generator_two_draws_ahead():
    """The backward pass replays the second call before the first: the generator must
    still end where the two forward calls left it, not at the first call's end."""
    dynamics = dropout_dynamics()
    layer = tfaca.ODELayer(dynamics, **ADAPTIVE)
    generator = dynamics.layers[1].seed_generator
    x = states()
    start = generator_state(dynamics)
    with tf.GradientTape() as tape:
        first = layer(x, training=True)
        second = layer(x, training=True)
        loss = tf.reduce_sum(first**2) + tf.reduce_sum(second**2)
    grads = tape.gradient(loss, dynamics.trainable_variables)
    np.testing.assert_array_equal(generator.state.numpy(), start + [0, 2])
    # Each call's part of the gradient is that of its own mask.
    ref_grads = []
    for state in (start, start + [0, 1]):
        field = fixed_mask_field(dynamics, state)
        _, g = loss_and_grads(lambda x: tfaca.odeint(field, x, [0.0, 1.0], **ADAPTIVE)[-1],
                              x, dynamics.trainable_variables)
        ref_grads.append(g[1:])
    assert_all_close(grads, [a + b for a, b in zip(*ref_grads)], rtol=1e-5)


def test_inference_applies_no_dropout():
    dynamics = dropout_dynamics()
    layer = tfaca.ODELayer(dynamics, **ADAPTIVE)
    x = states()
    start = generator_state(dynamics)
    dense_in, _, dense_out = dynamics.layers
    reference = tfaca.odeint(lambda t, y: dense_out(dense_in(y)), x, [0.0, 1.0], **ADAPTIVE)[-1]
    for training in (False, None):
        np.testing.assert_array_equal(layer(x, training=training), reference)
    np.testing.assert_array_equal(generator_state(dynamics), start)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.slow
@pytest.mark.slow_variants
def test_dropout_fit_step_is_the_fixed_mask_gradient(jit_compile):
    """One SGD step of `fit` moves each weight by -lr times the gradient of the batch loss
    computed with one mask, the one the generator held when the step began."""
    dynamics = dropout_dynamics()
    model = keras.Sequential([keras.Input((STATE,)), tfaca.ODELayer(dynamics, **ADAPTIVE)])
    lr = 0.1
    model.compile(keras.optimizers.SGD(lr), "mse", jit_compile=jit_compile)
    x = states()
    target = np.zeros((SMALL_BATCH, STATE), "float32")
    start = generator_state(dynamics)
    before = [v.numpy() for v in dynamics.trainable_variables]
    # Keras' default graph runs the layer's solver loops compiled with XLA too (the
    # layer's jit_compile="auto"), so in both cases XLA's generator draws the mask.
    field = fixed_mask_field(dynamics, start, jit_compile=True)
    with tf.GradientTape() as tape:
        y1 = tfaca.odeint(field, x, [0.0, 1.0], **ADAPTIVE)[-1]
        loss = tf.reduce_mean((y1 - target) ** 2)
    expected = tape.gradient(loss, dynamics.trainable_variables)
    logs = model.train_on_batch(x, target, return_dict=True)
    np.testing.assert_allclose(logs["loss"], float(loss), rtol=1e-5)
    steps = [(b - v.numpy()) / lr for b, v in zip(before, dynamics.trainable_variables)]
    assert_all_close(steps, expected, rtol=1e-4)
    np.testing.assert_array_equal(generator_state(dynamics), start + [0, 1])
    # The next batch draws another mask.
    history = model.fit(x, target, batch_size=SMALL_BATCH, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == 3, losses


# --------------------------------------------------------------------------------------
# Losses inside the dynamics: refused; weight regularizers: kept
# --------------------------------------------------------------------------------------


class AddsLoss(keras.layers.Layer):
    """Adds the mean square of its input as a loss, passes the input on."""

    def call(self, y):
        self.add_loss(tf.reduce_mean(y**2))
        return y


def _lossy_dynamics(kind):
    if kind == "activity_regularizer":
        offender = keras.layers.Dense(HIDDEN, activation="tanh", activity_regularizer="l2",
                                      name="offender")
        layers = [offender, keras.layers.Dense(STATE)]
    else:
        offender = AddsLoss(name="offender")
        layers = [keras.layers.Dense(HIDDEN, activation="tanh"), offender,
                  keras.layers.Dense(STATE)]
    return keras.Sequential(layers, name="lossy")


@pytest.mark.parametrize("mode", ["eager", "eager_training", "fit", "fit_xla"])
@pytest.mark.parametrize("kind", ["activity_regularizer", "add_loss"])
def test_losses_added_inside_the_dynamics_are_refused(kind, mode):
    model = keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(_lossy_dynamics(kind)), keras.layers.Dense(1)]
    )
    x = states()
    # The message names the layer, how it added the loss, and what to do instead.
    match = rf"'offender' \(.*{kind}\).*outside the ODELayer"
    with pytest.raises(ValueError, match=match) as info:
        if mode.startswith("eager"):
            model(x, training=mode == "eager_training")
        else:
            model.compile("sgd", "mse", jit_compile=mode == "fit_xla")
            model.fit(x, np.zeros((SMALL_BATCH, 1), "float32"), verbose=0)
    assert "kernel_regularizer" in str(info.value)  # ... and what stays allowed
    assert model.losses == []


@pytest.mark.slow
def test_activity_regularizer_on_the_ode_layer_regularizes_the_solution():
    """The alternative the refusal suggests works in `fit`."""
    ode = tfaca.ODELayer(mlp_dynamics(), activity_regularizer=keras.regularizers.L2(0.1))
    model = keras.Sequential([keras.Input((STATE,)), ode, keras.layers.Dense(1)])
    x = states()
    out = ode(x)
    (loss,) = ode.losses
    np.testing.assert_allclose(loss, 0.1 * np.sum(np.square(out)) / SMALL_BATCH, rtol=1e-5)
    model.compile("sgd", "mse", jit_compile=False)
    history = model.fit(x, np.zeros((SMALL_BATCH, 1), "float32"), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.slow
def test_weight_regularizers_in_the_dynamics_train(jit_compile):
    dynamics = keras.Sequential(
        [keras.layers.Dense(HIDDEN, activation="tanh",
                            kernel_regularizer=keras.regularizers.L2(0.01)),
         keras.layers.Dense(STATE, bias_regularizer=keras.regularizers.L1(0.02))]
    )
    model = keras.Sequential(
        [keras.Input((STATE,)), tfaca.ODELayer(dynamics), keras.layers.Dense(1)]
    )
    x, y = states(32), np.ones((32, 1), "float32")
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=SMALL_BATCH, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    def expected_terms():
        kernel, bias = dynamics.layers[0].kernel.numpy(), dynamics.layers[1].bias.numpy()
        return sorted([0.01 * float(np.sum(np.square(kernel))), 0.02 * float(np.sum(np.abs(bias)))])

    # model.losses: exactly the two weight regularization terms, before and after a call.
    for _ in range(2):
        assert sorted(float(v) for v in model.losses) == pytest.approx(expected_terms(), rel=1e-6)
        model(x, training=True)
    # And evaluate's loss includes them.
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    mse = float(np.mean((model(x).numpy() - y) ** 2))
    np.testing.assert_allclose(results["loss"], mse + sum(expected_terms()), rtol=1e-5)


# --------------------------------------------------------------------------------------
# Mixed precision
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
                               rtol=float(ml_dtypes.finfo(compute.as_numpy_dtype).eps))
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
