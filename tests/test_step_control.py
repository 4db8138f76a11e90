"""Step control (`_control`, the loop's use of it): the PID controller."""

import keras
import numpy as np
import pytest
import scipy.integrate
import tensorflow as tf

import tfaca
from helpers import F64, f64, mlp_dynamics
from tfaca._control import StepSizeController

MU = 10.0


def van_der_pol(t, y):
    return tf.stack([y[..., 1], MU * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], axis=-1)


def _solve(controller, rtol, y0=(2.0, 0.0), **kwargs):
    return tf.function(lambda: tfaca.solve(
        van_der_pol, f64(y0), [0.0, 30.0], rtol=rtol, atol=rtol * 1e-3, controller=controller,
        max_steps=100000, **kwargs))()


@pytest.mark.parametrize("per_sample", [False, True])
def test_pid_0_1_0_takes_exactly_the_integral_controllers_steps(per_sample):
    y0 = [[2.0, 0.0], [1.0, 1.0]]
    integral = _solve(None, 1e-5, y0, per_sample=per_sample)
    pid = _solve(tfaca.PIDController(0.0, 1.0, 0.0), 1e-5, y0, per_sample=per_sample)
    for a, b in zip(integral.stats, pid.stats):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(integral.ys, pid.ys)


def test_pi_control_rejects_fewer_trials_on_a_mildly_stiff_problem():
    reference = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 30.0), [2.0, 0.0],
        method="Radau", rtol=1e-11, atol=1e-13).y[:, -1]
    for rtol in (1e-3, 1e-5):
        integral = _solve(None, rtol)
        pi = _solve(tfaca.PIDController(0.4, 0.3, 0.0), rtol)
        assert int(pi.stats.num_rejected) < 0.75 * int(integral.stats.num_rejected), rtol
        # As accurate for the tolerance: both within 100 rtol of the reference at t = 30.
        for sol in (integral, pi):
            assert np.max(np.abs(sol.ys[-1] - reference)) < 100 * rtol


def test_the_update_reads_the_last_two_accepted_errors():
    c = StepSizeController(rtol=[1e-3], atol=[1e-6], pcoeff=0.4, icoeff=0.3, dcoeff=0.1)
    dt, order, k = f64([0.1]), 4, 5.0
    history = c.history(dt)
    np.testing.assert_array_equal(history, np.ones((2, 1)))
    # A rejected trial changes no history; an accepted one shifts it.
    history = c.remember(history, f64([2.0]), tf.constant([False]))
    np.testing.assert_array_equal(history, np.ones((2, 1)))
    history = c.remember(history, f64([0.5]), tf.constant([True]))
    history = c.remember(history, f64([0.25]), tf.constant([True]))
    np.testing.assert_array_equal(history, [[0.25], [0.5]])
    err = f64([0.8])
    b1, b2, b3 = (0.4 + 0.3 + 0.1) / k, -(0.4 + 0.2) / k, 0.1 / k
    factor = 0.9 * 0.8 ** -b1 * 0.25 ** -b2 * 0.5 ** -b3
    np.testing.assert_allclose(c.next_step(dt, err, order, history), 0.1 * max(factor, 1.0),
                               rtol=1e-14)
    # Rejected: the factor is not floored at 1.
    err = f64([3.0])
    factor = 0.9 * 3.0 ** -b1 * 0.25 ** -b2 * 0.5 ** -b3
    np.testing.assert_allclose(c.next_step(dt, err, order, history), 0.1 * factor, rtol=1e-14)


@pytest.mark.slow  # 14-23 s: the quick suite at CI's limit (stop 44)
def test_pid_gradients_replay_the_steps_taken():
    """ACA replays the accepted steps whatever chose them: its gradient equals the
    integral controller's where PID(0, 1, 0) took the same steps, and runs compiled."""
    w = tf.Variable(0.7, dtype=F64)

    @tf.function(jit_compile=True)
    def grad(controller):
        with tf.GradientTape() as tape:
            ys = tfaca.odeint(lambda t, y: -w * y + tf.sin(y), f64([1.0, 2.0]), [0.0, 2.0, 5.0],
                              controller=controller, rtol=1e-6)
            loss = tf.reduce_sum(ys ** 2)
        return tape.gradient(loss, w)

    np.testing.assert_array_equal(grad(None), grad(tfaca.PIDController(0.0, 1.0, 0.0)))
    np.testing.assert_allclose(grad(tfaca.PIDController(0.4, 0.3, 0.0)), grad(None), rtol=1e-4)


def test_bad_controllers_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="icoeff"):
        tfaca.PIDController(0.4, 0.0)
    with pytest.raises(ValueError, match="pcoeff"):
        tfaca.PIDController(float("nan"))
    with pytest.raises(TypeError, match="controller"):
        tfaca.solve(van_der_pol, f64([2.0, 0.0]), [0.0, 1.0], controller="pid")


def test_layer_keeps_its_controller_in_its_config():
    layer = tfaca.ODELayer(mlp_dynamics(), controller=tfaca.PIDController(0.4, 0.3, 0.0))
    config = layer.get_config()
    assert config["controller"] == {"pcoeff": 0.4, "icoeff": 0.3, "dcoeff": 0.0}
    revived = tfaca.ODELayer.from_config(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)).get_config())
    assert revived.controller == {"pcoeff": 0.4, "icoeff": 0.3, "dcoeff": 0.0}
    assert revived.solver_options.controller == tfaca.PIDController(0.4, 0.3, 0.0)
    state = layer.dynamics.layers[-1].units if hasattr(layer.dynamics, "layers") else 4
    x = np.random.default_rng(0).normal(size=(4, state)).astype("float32")
    assert np.all(np.isfinite(layer(x)))
