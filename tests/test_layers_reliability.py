"""`tfaca.ODELayer` where Keras features meet the solver: randomness in the dynamics (one
draw per call, exact gradients), losses added inside the dynamics (refused) and weight
regularizers (kept), the failure metric, and the layer's one gradient strategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfaca

STATE = 4
HIDDEN = 16
BATCH = 8
RATE = 0.5  # dropout scale 1 / (1 - RATE) = 2 is exact: fixed-mask references match bit for bit


# Each test starts from a fresh Keras session and seed (conftest.py).
pytestmark = pytest.mark.usefixtures("keras_seed")


def states(n=BATCH, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(n, STATE)).astype("float32"))


def mlp_dynamics(**dense_kwargs):
    return keras.Sequential(
        [keras.layers.Dense(HIDDEN, activation="tanh", **dense_kwargs), keras.layers.Dense(STATE)]
    )


def dropout_dynamics():
    """Dense -> Dropout -> Dense, built for `(BATCH, STATE)` states."""
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
    draw = tf.function(lambda: dropout(tf.ones((BATCH, HIDDEN)), training=True),
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


# --------------------------------------------------------------------------------------
# 1. Randomness in the dynamics: one draw per call
# --------------------------------------------------------------------------------------

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
    target = np.zeros((BATCH, STATE), "float32")
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
    history = model.fit(x, target, batch_size=BATCH, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == 3, losses


# --------------------------------------------------------------------------------------
# 2. Losses inside the dynamics: refused; weight regularizers: kept
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
            model.fit(x, np.zeros((BATCH, 1), "float32"), verbose=0)
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
    np.testing.assert_allclose(loss, 0.1 * np.sum(np.square(out)) / BATCH, rtol=1e-5)
    model.compile("sgd", "mse", jit_compile=False)
    history = model.fit(x, np.zeros((BATCH, 1), "float32"), epochs=2, verbose=0)
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
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
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
# 3. The failure metric
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
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    assert history.history["ode_failures"] == [failures, failures]
    assert np.all(np.isfinite(history.history["loss"])) == (failures == 0.0)
    results = model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
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
# 4. One gradient strategy per layer
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
