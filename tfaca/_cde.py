"""Neural controlled differential equations (Kidger et al., NeurIPS 2020):
`dz = func(t, z) dX(t)`, solved as the ODE `dz/dt = func(t, z) dX/dt` through `solve`'s
`control`, so that every option, gradient mode and output mode of `solve` applies."""

import tensorflow as tf

from tfaca import _jit, _paths
from tfaca._odeint import solve


def _cde_field(func):
    """`func(t, z, *args) -> [batch, hidden, channels]` as an ODE field driven by `dX/dt`."""

    def field(t, z, dx, *args):
        if not tf.is_tensor(z):
            raise TypeError("A controlled differential equation's state `z0` must be one "
                            f"tensor of shape (batch, hidden). Received: {z!r}")
        matrix = tf.convert_to_tensor(func(t, z, *args))
        if matrix.shape.rank != 3 or not matrix.shape[:2].is_compatible_with(z.shape) or \
                not matrix.shape[2:].is_compatible_with(dx.shape[-1:]):
            raise ValueError(
                "`func` must return a (batch, hidden, channels) matrix: the state's shape "
                f"{z.shape} followed by the path's {dx.shape[-1]} channels. Received: shape "
                f"{matrix.shape}")
        return tf.linalg.matvec(matrix, tf.cast(dx, matrix.dtype))

    return _jit.derived(field, func, "cde")


def solve_cde(func, z0, path, ts, **kwargs):
    """Solves the controlled differential equation `dz = func(t, z, *args) dX(t)` from
    `z(ts[0]) = z0` and returns a `Solution`.

    As the ODE `dz/dt = func(t, z, *args) @ dX/dt(t)`, one batched matrix-vector product
    per evaluation (Kidger et al., 2020).

    Args:
        func: `func(t, z, *args)` returning `(batch, hidden, channels)`: for each sample
            the matrix that maps the path's increments to the state's.
        z0: `(batch, hidden)`, the initial state (in a neural CDE, a layer of the first
            observation).
        path: a `tfaca.LinearPath`, `RectilinearPath`, `HermitePath` or `CubicPath` of
            `channels` channels (time usually one of them). Gradients reach its values and
            times.
        ts: output times in the path's parameter (for a `RectilinearPath`,
            `path.observation_times`), as `solve`'s: shared `(n,)` or per sample
            `(batch, n)`.
        **kwargs: any option of `tfaca.solve` (`args`, `method`, `rtol`, `atol`,
            `gradient`, `per_sample`, `interpolate`, ...).
    """
    if "control" in kwargs:
        raise TypeError("`solve_cde` takes the path as `path`; `control` is `solve`'s.")
    if not isinstance(path, _paths.AbstractPath):
        raise TypeError(
            "`path` must be a tfaca.LinearPath, RectilinearPath, HermitePath or CubicPath. "
            f"Received: path={path!r}")
    return solve(_cde_field(func), z0, ts, control=_paths.Derivative(path), **kwargs)


def cdeint(func, z0, path, ts, **kwargs):
    """Solves `dz = func(t, z, *args) dX(t)` and returns the states at `ts`,
    `(len(ts), batch, hidden)` (`(n, batch, hidden)` with times per sample). Same arguments
    as `tfaca.solve_cde`, which also returns the statistics.

    Example, a neural CDE's hidden state through a series:

    ```python
    path = tfaca.HermitePath(times, values)  # times (n,), values (batch, n, channels)
    field = keras.Sequential([keras.layers.Dense(64, activation="tanh"),
                              keras.layers.Dense(hidden * path.channels),
                              keras.layers.Reshape((hidden, path.channels))])
    z = tfaca.cdeint(lambda t, z: field(z), z0, path, times)[-1]
    ```
    """
    return solve_cde(func, z0, path, ts, **kwargs).ys
