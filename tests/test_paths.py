"""`_paths`: the four paths through observed series, their derivatives, padding and masks."""

import numpy as np
import pytest
import scipy.interpolate
import tensorflow as tf

import tfaca

from helpers import observed_series

PATHS = [tfaca.LinearPath, tfaca.RectilinearPath, tfaca.HermitePath, tfaca.CubicPath]
SMOOTH = [tfaca.LinearPath, tfaca.HermitePath, tfaca.CubicPath]  # parametrized by time


def series(batch=3, n=7, channels=2, seed=0):
    return observed_series(batch, n, channels, seed, span=5.0)


def at(path, times):
    """`[batch, len(times), channels]`: the path evaluated at each time."""
    return np.stack([path.evaluate(t).numpy() for t in times], axis=1)


@pytest.mark.parametrize("cls", SMOOTH)
def test_interpolates_its_knots_exactly(cls):
    t, x = series()
    np.testing.assert_allclose(at(cls(t, x), t), x, rtol=0, atol=1e-14)


def test_rectilinear_knots_alternate_time_and_values():
    t, x = series()
    path = tfaca.RectilinearPath(t, x)
    s = path.observation_times.numpy()
    np.testing.assert_array_equal(s, 2.0 * np.arange(len(t)))
    at_obs = at(path, s)
    np.testing.assert_allclose(at_obs[..., 1:], x, atol=1e-15)
    np.testing.assert_allclose(at_obs[0, :, 0], t, atol=1e-15)
    # Between observations i and i+1: first the time moves (values held), then the values.
    mid = at(path, s[:-1] + 0.5)
    np.testing.assert_allclose(mid[..., 1:], x[:, :-1], atol=1e-15)
    np.testing.assert_allclose(mid[0, :, 0], (t[:-1] + t[1:]) / 2, atol=1e-14)
    late = at(path, s[:-1] + 1.5)
    np.testing.assert_allclose(late[0, :, 0], t[1:], atol=1e-15)
    np.testing.assert_allclose(late[..., 1:], (x[:, :-1] + x[:, 1:]) / 2, atol=1e-14)


def test_linear_is_the_straight_line_and_cubic_is_scipys_natural_spline():
    t, x = series()
    query = np.linspace(0.0, t[-1], 29)
    expected = np.stack([np.stack([np.interp(query, t, x[b, :, c]) for c in range(2)], -1)
                         for b in range(3)])
    np.testing.assert_allclose(at(tfaca.LinearPath(t, x), query), expected, atol=1e-14)
    spline = scipy.interpolate.CubicSpline(t, x, axis=1, bc_type="natural")
    np.testing.assert_allclose(at(tfaca.CubicPath(t, x), query), spline(query), atol=1e-12)
    np.testing.assert_allclose(
        np.stack([tfaca.CubicPath(t, x).derivative(q).numpy() for q in query], 1),
        spline(query, 1), atol=1e-11)


def test_hermite_is_online_and_continuously_differentiable():
    t, x = series(n=9)
    path = tfaca.HermitePath(t, x)
    # The piece after t_3 depends on observations up to t_4 only.
    later = x.copy()
    later[:, 5:] += 10.0
    query = np.linspace(t[3], t[4], 7)
    np.testing.assert_allclose(at(tfaca.HermitePath(t, later), query), at(path, query), atol=1e-14)
    # Its derivative at each inner knot is the slope of the piece before it, from both sides.
    for i in range(1, len(t) - 1):
        slope = (x[:, i] - x[:, i - 1]) / (t[i] - t[i - 1])
        for side in (-1e-9, 1e-9):
            np.testing.assert_allclose(path.derivative(t[i] + side).numpy(), slope,
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", PATHS)
def test_derivative_matches_finite_differences(cls):
    t, x = series()
    path = cls(t, x)
    knots = path.times.numpy()[0]
    rng = np.random.default_rng(3)
    h = 1e-6
    for q in rng.uniform(knots[0] + 1e-3, knots[-1] - 1e-3, 12):
        if np.min(np.abs(knots - q)) < 1e-4:
            continue  # a knot of a linear path: no derivative there
        fd = (path.evaluate(q + h).numpy() - path.evaluate(q - h).numpy()) / (2 * h)
        np.testing.assert_allclose(path.derivative(q).numpy(), fd, rtol=1e-6, atol=1e-7)


def test_linear_derivative_is_left_continuous_at_knots():
    t, x = series()
    path = tfaca.LinearPath(t, x)
    slope_before = (x[:, 3] - x[:, 2]) / (t[3] - t[2])
    np.testing.assert_allclose(path.derivative(t[3]).numpy(), slope_before, rtol=1e-12)
    assert tfaca.LinearPath.jumps and tfaca.RectilinearPath.jumps
    assert not tfaca.HermitePath.jumps and not tfaca.CubicPath.jumps


@pytest.mark.parametrize("cls", PATHS)
def test_outside_the_knots_the_path_holds_and_stops_moving(cls):
    t, x = series()
    path = cls(t, x)
    knots = path.times.numpy()[0]
    np.testing.assert_allclose(path.evaluate(knots[-1] + 3.0).numpy(),
                               path.evaluate(knots[-1]).numpy(), atol=1e-14)
    np.testing.assert_allclose(path.evaluate(knots[0] - 1.0).numpy(),
                               path.evaluate(knots[0]).numpy(), atol=1e-14)
    np.testing.assert_array_equal(path.derivative(knots[-1] + 0.5).numpy(), 0.0)


@pytest.mark.parametrize("cls", PATHS)
def test_per_series_times_and_one_time_per_sample_equal_each_series_alone(cls):
    t, x = series()
    # Row 1 has five observations, padded by repeating its last time (its padded values
    # are garbage and must be ignored).
    times = np.stack([t, np.r_[t[:5], t[4], t[4]], t * 0.9])
    x[1, 5:] = 1e6
    path = cls(times, x)
    rng = np.random.default_rng(4)
    for _ in range(4):
        q = tf.constant(rng.uniform(0.0, path.times.numpy().max(), 3))
        alone = [cls(times[b:b + 1], x[b:b + 1]) for b in range(3)]
        for method in ("evaluate", "derivative"):
            expected = np.stack([getattr(a, method)(q[b]).numpy()[0] for b, a in enumerate(alone)])
            np.testing.assert_allclose(getattr(path, method)(q).numpy(), expected, atol=1e-12)
    if cls is not tfaca.RectilinearPath:
        # Past its last real time the padded series holds its last observation.
        np.testing.assert_allclose(path.evaluate(t[-1]).numpy()[1], x[1, 4], atol=1e-12)


def test_missing_values_are_filled_from_the_last_observation():
    t, x = series()
    mask = np.ones_like(x, bool)
    mask[0, 0, 0] = False  # before the first observation: the first one after it
    mask[0, 3, 1] = False  # inside: the last one before it
    mask[1, :, 1] = False  # never observed: 0
    with_nan = np.where(mask, x, np.nan)
    for path in (tfaca.LinearPath(t, x, mask=mask), tfaca.LinearPath(t, with_nan)):
        knots = at(path, t)
        assert knots[0, 0, 0] == x[0, 1, 0]
        assert knots[0, 3, 1] == x[0, 2, 1]
        np.testing.assert_array_equal(knots[1, :, 1], 0.0)
        np.testing.assert_allclose(knots[2], x[2], atol=1e-14)


def test_observed_count_channels_and_gradients_skip_missing_values():
    t, x = series()
    mask = np.ones_like(x, bool)
    mask[0, 3, 1] = False
    path = tfaca.LinearPath(t, x, mask=mask, observed_count=True)
    assert path.channels == 4
    np.testing.assert_array_equal(at(path, t)[0, :, 2:], np.cumsum(mask[0], axis=0))
    values = tf.constant(np.where(mask, x, np.nan))
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = tf.reduce_sum(tfaca.LinearPath(t, values).evaluate(0.5 * (t[3] + t[4])))
    grad = tape.gradient(out, values).numpy()
    assert np.all(np.isfinite(grad)) and grad[0, 3, 1] == 0.0
    # Halfway from t_3 (missing: filled with x_2) to t_4.
    assert grad[0, 2, 1] == 0.5 and grad[0, 4, 1] == 0.5


@pytest.mark.parametrize("cls", PATHS)
def test_values_and_times_get_gradients_matching_finite_differences(cls):
    t, x = series(batch=2, n=5)
    times, values = tf.constant(t), tf.constant(x)
    q = 0.37 * t[-1] if cls is not tfaca.RectilinearPath else 3.3

    def loss(times, values):
        path = cls(times, values)
        return tf.reduce_sum(path.evaluate(q) ** 2 + path.derivative(q))

    with tf.GradientTape() as tape:
        tape.watch([times, values])
        out = loss(times, values)
    g_t, g_x = tape.gradient(out, [times, values])
    eps = 1e-6
    i = (1, 2, 1)
    bump = np.zeros_like(x)
    bump[i] = eps
    fd = (loss(times, values + bump) - loss(times, values - bump)) / (2 * eps)
    np.testing.assert_allclose(g_x.numpy()[i], fd.numpy(), rtol=1e-6, atol=1e-8)
    bump = np.zeros_like(t)
    bump[2] = eps
    fd = (loss(times + bump, values) - loss(times - bump, values)) / (2 * eps)
    np.testing.assert_allclose(g_t.numpy()[2], fd.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", PATHS)
def test_paths_build_and_evaluate_under_xla(cls):
    t, x = series()

    @tf.function(jit_compile=True)
    def run(values, q):
        path = cls(t, values)
        return path.evaluate(q), path.derivative(q)

    value, slope = run(tf.constant(x), tf.constant(1.3, tf.float64))
    np.testing.assert_allclose(value.numpy(), cls(t, x).evaluate(1.3).numpy(), atol=1e-13)
    np.testing.assert_allclose(slope.numpy(), cls(t, x).derivative(1.3).numpy(), atol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(times=[0.0, 1.0], values=np.zeros((2, 2))), ValueError, "`values` must have shape"),
    (dict(times=[0.0, 1.0], values=np.zeros((1, 2, 1), np.int32)), TypeError, "`values` must be floating"),
    (dict(times=[0.0, 1.0, 2.0], values=np.zeros((1, 2, 1))), ValueError, "same number of observations"),
    (dict(times=[0.0], values=np.zeros((1, 1, 1))), ValueError, "at least two observations"),
    (dict(times=[0.0, 2.0, 1.0], values=np.zeros((1, 3, 1))), ValueError, "strictly increasing"),
    (dict(times=[0.0, 1.0], values=np.zeros((1, 2, 1)), mask=np.ones((1, 2))), ValueError, "`mask` must have the shape"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        tfaca.LinearPath(**kwargs)
