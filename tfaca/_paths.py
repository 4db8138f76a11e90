"""Paths through observed series: the inputs of controlled ODEs and neural CDEs.

Every path is piecewise cubic in its parameter: on the piece `[t_i, t_{i+1}]`,
`X(t) = a_i + b_i s + c_i s^2 + d_i s^3` with `s = t - t_i`, the coefficients computed once
from the observations and kept as one tensor `[batch * (n - 1), 4, channels]`, a row per piece:
an evaluation gathers one row per sample, so the gradient a replayed step sends the
coefficients is those rows (`tf.IndexedSlices`), added into the total where they belong
rather than as a dense tensor per evaluation. The four kinds differ only in how:

- `LinearPath`: the straight lines between observations (continuous; its derivative jumps
  at every knot, so the solver steps onto the knots);
- `RectilinearPath`: time and values move in turn (torchcde's rectilinear interpolation), a
  linear path over a parameter of its own, `0, 1, ..., 2(n - 1)`;
- `HermitePath`: cubic Hermite with backward differences (Kidger et al., 2021): the piece
  after `t_i` depends on observations up to `t_{i+1}` only, usable online; continuously
  differentiable;
- `CubicPath`: the natural cubic spline (twice continuously differentiable, every
  observation shapes every piece).

Outside its first and last knot a path holds its end value (its derivative is 0 there): a
series padded by repeating its last time stops moving there, as padded output times do.
Evaluation is left-continuous (a knot belongs to the piece before it). Solves step onto
every knot of a path whose derivative jumps (linear, rectilinear): the step ends just
before the knot and the next starts just after it (`_loop`), so no step straddles a jump.
The smooth paths' knots are left to the error control, as torchcde's and diffrax's are.
"""

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf


class Pieces(NamedTuple):
    """The tensors of a path, as they travel through a solve (`args`): knots and coefficients."""

    times: Any  # [R, n], R = 1 (shared) or batch
    coeffs: Any  # [batch * (n - 1), 4, channels]: a, b, c, d of series 0's pieces, then 1's...


def _pieces(times, a, b, c, d):
    """`Pieces` from the coefficients, each `[batch, n - 1, channels]`."""
    coeffs = tf.stack([a, b, c, d], axis=2)
    shape = tf.concat([[-1], tf.shape(coeffs)[2:]], 0)
    return Pieces(times, tf.ensure_shape(tf.reshape(coeffs, shape), [None, 4, a.shape[-1]]))


def evaluate(pieces, t, derivative=False):
    """`X(t)` (or `dX/dt`) of `pieces` at `t`: a scalar, or `[batch]` (one time per sample).
    Returns `[batch, channels]`."""
    times, coeffs = pieces
    t = tf.cast(t, times.dtype)
    num_pieces = tf.shape(times)[1] - 1
    batch = tf.shape(coeffs)[0] // num_pieces
    # Broadcasts that carry gradients are written as sums with zeros shaped like the batch,
    # never `tf.broadcast_to`: the gradient of `broadcast_to` takes the shape as a value,
    # which inside a `tf.cond` of a compiled replay XLA cannot know at compile time.
    zeros = tf.zeros(tf.stack([batch, 1]), times.dtype)
    if t.shape.rank:
        query = t[:, None]
        times = times + zeros
    else:  # one time: one piece per row of knots (one row when the knots are shared)
        query = tf.fill(tf.stack([tf.shape(times)[0], 1]), t)
    first, last = times[:, :1], times[:, -1:]
    inside = (query >= first) & (query <= last)
    query = tf.clip_by_value(query, first, last)
    # Left-continuous: the piece i with t_i < t <= t_{i+1} (the first piece at t_0).
    index = tf.clip_by_value(tf.searchsorted(times, query, side="left", out_type=tf.int32) - 1,
                             0, num_pieces - 1)[:, 0]  # [R']
    s = query - tf.gather(times, index, batch_dims=1)[:, None] + zeros  # [batch, 1]
    rows = tf.range(batch) * num_pieces + index  # R' is 1 or batch
    a, b, c, d = tf.unstack(tf.gather(coeffs, rows), axis=1)
    if derivative:
        return tf.where(inside, b + s * (2.0 * c + 3.0 * s * d), tf.zeros_like(b))
    return a + s * (b + s * (c + s * d))


class AbstractPath:
    """A path `X(t)` through observations `values` at `times` (see the module docstring).

    Args:
        times: `(n,)` shared by the batch, or `(batch, n)` per series: strictly increasing,
            and a row may end in repeats of its last time (padding for a series with
            fewer observations; its padded values are ignored).
        values: `(batch, n, channels)` floating observations. NaN marks a missing value
            when `mask` is None.
        mask: optional, the shape of `values`: True (or 1) where a value was observed.
            A missing value is filled with the last observation of its channel before it
            (the first one after it, before a channel's first observation; 0 for a
            channel never observed), as latent-ODE and neural-CDE practice does.
        observed_count: if True, append one channel per value channel holding how many
            values of it were observed up to each time (the "observational intensity" of
            Kidger et al., 2020): the path then has `2 * channels` channels, values first.
    """

    jumps = False  # whether the derivative jumps at the knots

    def __init__(self, times, values, mask=None, observed_count=False):
        values = tf.convert_to_tensor(values)
        if not values.dtype.is_floating:
            raise TypeError(f"`values` must be floating. Received dtype {values.dtype.name}")
        if values.shape.rank != 3:
            raise ValueError(
                "`values` must have shape (batch, n, channels). Received: values with shape "
                f"{values.shape}")
        dtype = values.dtype
        times = tf.cast(times, dtype) if tf.is_tensor(times) else tf.constant(
            np.asarray(times, dtype=dtype.as_numpy_dtype))
        if times.shape.rank not in (1, 2):
            raise ValueError(
                "`times` must have shape (n,) or (batch, n). Received: times with shape "
                f"{times.shape}")
        times = times[None] if times.shape.rank == 1 else times
        if not times.shape[1:].is_compatible_with(values.shape[1:2]):
            raise ValueError(
                f"`times` and `values` must hold the same number of observations n. Received: "
                f"times with shape {times.shape}, values with shape {values.shape}")
        if times.shape[1] is not None and times.shape[1] < 2:
            raise ValueError(f"A path needs at least two observations. Received: times with "
                             f"shape {times.shape}")
        _check_times(times)
        if mask is None:
            mask = tf.math.is_finite(values)
        else:
            mask = tf.convert_to_tensor(mask)
            if not mask.shape.is_compatible_with(values.shape):
                raise ValueError(
                    f"`mask` must have the shape of `values` {values.shape}. Received: mask "
                    f"with shape {mask.shape}")
            mask = tf.cast(mask, tf.bool)
        last = _last_real(times)  # [R]
        values = _filled(values, mask)
        if observed_count:
            counts = tf.cumsum(tf.cast(mask, dtype), axis=1)
            values = tf.concat([values, counts], axis=2)
        # Padding holds the last real observation.
        n = tf.shape(times)[1]
        keep = tf.minimum(tf.range(n)[None, :], last[:, None])  # [R, n]
        keep = tf.broadcast_to(keep, tf.stack([tf.shape(values)[0], n]))
        values = tf.gather(values, keep, batch_dims=1)
        self.dtype = dtype
        self.channels = values.shape[-1]
        self._pieces = self._pieces_of(times, values)

    @property
    def times(self):
        """The knots, `[1, n]` or `[batch, n]`, in the path's parameter."""
        return self._pieces.times

    def evaluate(self, t):
        """`X(t)`, `[batch, channels]`; `t` a scalar or one time per sample `[batch]`."""
        return evaluate(self._pieces, tf.convert_to_tensor(t, self.dtype))

    def derivative(self, t):
        """`dX/dt`, `[batch, channels]`; `t` a scalar or one time per sample `[batch]`."""
        return evaluate(self._pieces, tf.convert_to_tensor(t, self.dtype), derivative=True)

    def _pieces_of(self, times, values):
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(knots={self.times.shape[-1]}, "
                f"channels={self.channels}, dtype={self.dtype.name})")


def _check_times(times):
    """Eagerly: `times` rows strictly increasing, then possibly repeating their last time."""
    if not hasattr(times, "numpy"):
        return
    t = times.numpy()
    diffs = np.diff(t, axis=1)
    moves = diffs > 0
    ok = np.all((diffs > 0) | (diffs == 0), axis=1) & np.all(moves[:, 1:] <= moves[:, :-1], axis=1)
    if not np.all(ok & moves[:, 0]):
        row = int(np.argmin(ok & moves[:, 0]))
        raise ValueError(
            "`times` must be strictly increasing in every row, and may end in repeats of the "
            f"row's last time (padding). Row {row} is not: {t[row]}")


def _last_real(times):
    """`[R]` int32: each row's last time that is not a repeat."""
    return tf.reduce_sum(tf.cast(tf.not_equal(times[:, 1:], times[:, :-1]), tf.int32), axis=1)


def _filled(values, mask):
    """Missing values filled with the channel's last observation before them, else the first
    after them, else 0."""
    n = tf.shape(values)[1]
    position = tf.broadcast_to(tf.range(n)[None, :, None], tf.shape(values))
    seen = tf.where(mask, position, -1)
    # A running maximum over time: the last observed position up to each time.
    last_seen = tf.transpose(tf.scan(tf.maximum, tf.transpose(seen, [1, 0, 2])), [1, 0, 2])
    first_seen = tf.argmax(tf.cast(mask, tf.int32), axis=1, output_type=tf.int32)  # [B, C]
    source = tf.where(last_seen >= 0, last_seen, first_seen[:, None, :])
    gathered = tf.gather(tf.transpose(values, [0, 2, 1]), tf.transpose(source, [0, 2, 1]),
                         batch_dims=2)
    gathered = tf.transpose(gathered, [0, 2, 1])
    # A channel never observed is 0 (its entries, NaN or not, get no gradient).
    ever = tf.reduce_any(mask, axis=1, keepdims=True)
    return tf.where(ever, gathered, tf.zeros_like(gathered))


def _slopes(times, values):
    """`(dt [R, n-1, 1], slopes [B, n-1, C])`, slope 0 on padded (zero-length) pieces."""
    dt = (times[:, 1:] - times[:, :-1])[:, :, None]
    dx = values[:, 1:] - values[:, :-1]
    safe = tf.where(dt > 0, dt, tf.ones_like(dt))
    return dt, tf.where(dt > 0, dx / safe, tf.zeros_like(dx))


class LinearPath(AbstractPath):
    """Linear interpolation of the observations (see `AbstractPath` for the arguments).
    Its derivative jumps at every knot: solves step onto the knots."""

    jumps = True

    def _pieces_of(self, times, values):
        _, slope = _slopes(times, values)
        zero = tf.zeros_like(slope)
        return _pieces(times, values[:, :-1], slope, zero, zero)


class RectilinearPath(LinearPath):
    """Rectilinear interpolation (torchcde's): time and values move in turn, over a parameter
    of the path's own, `s = 0, 1, ..., 2(n - 1)`. On `[2i, 2i + 1]` the time channel
    (channel 0) goes from `t_i` to `t_{i+1}` while the values hold `x_i`; on `[2i + 1, 2i + 2]`
    the values go to `x_{i+1}` at time `t_{i+1}`. Observation `i` is at `s = 2i`
    (`observation_times`); solve over `s` (`cdeint(..., ts=path.observation_times)`). Being
    online and piecewise linear, its derivative jumps at the knots, which solves step onto.
    Arguments as `AbstractPath`; `times` may be per series, the parameter is shared."""

    def _pieces_of(self, times, values):
        batch = tf.shape(values)[0]
        n = tf.shape(times)[1]
        times_b = tf.broadcast_to(times, tf.stack([batch, n]))[:, :, None]
        # Knot 2i: (t_i, x_i); knot 2i + 1: (t_{i+1}, x_i); the last: (t_{n-1}, x_{n-1}).
        even = tf.concat([times_b, values], axis=2)
        odd = tf.concat([times_b[:, 1:], values[:, :-1]], axis=2)
        pairs = tf.reshape(tf.stack([even[:, :-1], odd], axis=2),
                           tf.stack([batch, 2 * (n - 1), tf.shape(even)[2]]))
        knots = tf.concat([pairs, even[:, -1:]], axis=1)
        s = tf.cast(tf.range(2 * n - 1), values.dtype)[None]
        self.channels = values.shape[-1] + 1 if values.shape[-1] is not None else None
        return super()._pieces_of(s, knots)

    @property
    def observation_times(self):
        """`[n]`: the parameter at each observation, `0, 2, ..., 2(n - 1)`."""
        return self.times[0, ::2]


class HermitePath(AbstractPath):
    """Cubic Hermite interpolation with backward differences (torchcde's
    `hermite_cubic_coefficients_with_backward_differences`): at each knot the derivative is
    the slope of the piece before it (the first piece's own at the first knot). The piece
    after `t_i` uses the observations up to `t_{i+1}` only (online), and the path is
    continuously differentiable. Arguments as `AbstractPath`."""

    def _pieces_of(self, times, values):
        dt, slope = _slopes(times, values)
        # Derivative at the start of each piece: the previous piece's slope.
        start = tf.concat([slope[:, :1], slope[:, :-1]], axis=1)
        moving = dt > 0
        safe = tf.where(moving, dt, tf.ones_like(dt))
        start = tf.where(moving, start, tf.zeros_like(start))
        c = tf.where(moving, 2.0 * (slope - start) / safe, tf.zeros_like(slope))
        d = tf.where(moving, (start - slope) / safe ** 2, tf.zeros_like(slope))
        return _pieces(times, values[:, :-1], start, c, d)


class CubicPath(AbstractPath):
    """The natural cubic spline through the observations (second derivative 0 at both ends
    of each series): twice continuously differentiable. Arguments as `AbstractPath`."""

    def _pieces_of(self, times, values):
        dt, slope = _slopes(times, values)  # [R, n-1, 1], [B, n-1, C]
        h = dt[:, :, 0]
        batch = tf.shape(values)[0]
        # Second derivatives M_1 .. M_{n-2} (M_0 = M_{n-1} = 0) of each series: one
        # tridiagonal system per row; a padded knot's equation is M_i = 0.
        interior = (h[:, :-1] > 0) & (h[:, 1:] > 0)  # [R, n-2]
        lower = tf.where(interior, h[:, :-1], tf.zeros_like(h[:, :-1]))
        upper = tf.where(interior, h[:, 1:], tf.zeros_like(h[:, 1:]))
        main = tf.where(interior, 2.0 * (h[:, :-1] + h[:, 1:]), tf.ones_like(h[:, 1:]))
        rhs = tf.where(interior[:, :, None], 6.0 * (slope[:, 1:] - slope[:, :-1]),
                       tf.zeros_like(slope[:, 1:]))
        m = tf.shape(main)[1]
        diagonals = tf.stack([
            tf.concat([upper[:, :-1], tf.zeros_like(upper[:, :1])], 1),  # superdiagonal
            main,
            tf.concat([tf.zeros_like(lower[:, :1]), lower[:, 1:]], 1),  # subdiagonal
        ], axis=1)
        diagonals = tf.broadcast_to(diagonals, tf.stack([batch, 3, m]))
        if main.shape[1] == 0:  # two knots: a straight line
            second = rhs
        else:
            second = tf.linalg.tridiagonal_solve(diagonals, rhs, partial_pivoting=False)
        zero = tf.zeros_like(slope[:, :1])
        second = tf.concat([zero, second, zero], axis=1)  # [B, n, C]
        m0, m1 = second[:, :-1], second[:, 1:]
        safe = tf.where(dt > 0, dt, tf.ones_like(dt))
        b = slope - dt * (2.0 * m0 + m1) / 6.0
        c = m0 / 2.0
        d = tf.where(dt > 0, (m1 - m0) / (6.0 * safe), tf.zeros_like(m0))
        return _pieces(times, values[:, :-1], b, c, d)


class Derivative(NamedTuple):
    """`solve(..., control=Derivative(path))` passes `dX/dt` to `func` (`cdeint`)."""

    path: Any
