"""Diagonally implicit Runge–Kutta (ESDIRK) solvers for stiff problems.

Algorithm (Hairer & Wanner, "Solving ODEs II", IV.8; Kværnø, "Singly diagonally implicit
Runge–Kutta methods with an explicit first stage", BIT 44, 2004). The first stage is
`k_0 = f(t0, y0)`; every later stage solves

    z_i = base_i + h f(t0 + c_i dt, z_i),   base_i = y0 + dt sum_{j<i} a_ij k_j,  h = gamma dt

by the simplified Newton iteration `z <- z - M^-1 (z - base_i - h f(t_i, z))` with
`M = I - h J`, `J` the Jacobian of `func` at the step's start, computed and inverted
once per trial step and reused by every stage and iteration. The iteration stops by
Hairer's criterion (the contraction rate `rate` of successive corrections predicts the
remaining error `rate / (1 - rate) * |correction|`, in the step-size controller's scaled
norm, below `kappa`); a rate of 1 or more, or `max_iterations` without converging, fails
the trial: its error ratio is infinite, so the controller rejects it and shrinks the step,
as diffrax and Hairer's codes do (with a fixed `step_size`, which cannot shrink, the solve
fails as non-finite). The stage's slope is `k_i = (z_i - base_i) / h`, not
`f(t_i, z_i)`: the iterate's residual error then enters `y1` once instead of multiplied by
the problem's stiffness (Hairer & Wanner IV.8, and an evaluation saved).

Gradients. ACA's replay rebuilds each accepted step's stages by the same iterations (values
only), then differentiates the converged stage equations by the implicit function theorem:

    z_i = z* - M*^-1 (r(z*) - stop_gradient(r(z*))),   r(z) = z - base_i - h f(t_i, z)

with `M* = I - h J(t_i, z*)` at the converged stage. Its value is `z*`; its derivative
with respect to `base_i`, `h`, `t_i`, the args and the variables `func` reads is the
implicit function theorem's `-M*^-1 dr`: one transposed solve per stage in the backward
pass (one Jacobian and inversion per stage, in the replay only). That is the exact
derivative of the step whose stages solve their equations exactly: what backpropagation
through the Newton iterations tends to as they converge (`gradient="naive"` does that,
holding `J` constant), without keeping them.

`jacobian`: `"full"` takes the Jacobian of the whole state flattened (`[N, N]`);
`"batch"` one `[d, d]` block per sample of the leading batch axis (`[batch, d, d]`,
`tf.GradientTape.batch_jacobian`), which assumes the samples do not interact (a neural
ODE's batch); `"auto"`: `"batch"` with per-sample steps (`per_sample=True`, where each
sample is solved on its own), else `"full"`.
"""

import numbers

import tensorflow as tf

from tfaca._internals import recording
from tfaca._solvers import AbstractSolver, _hermite, _weighted_sum, per_row
from tfaca._tableau import ButcherTableau

_JACOBIANS = ("auto", "full", "batch")


class _Layout:
    """The state (a flat list of components) as the vector the Jacobian is taken over:
    `[N]` (`batched=False`) or `[batch, d]` (`batched=True`)."""

    def __init__(self, batched, like):
        self.batched = batched
        self.shapes = [tf.shape(x) for x in like]
        if batched:
            self.sizes = [_static_or(x.shape[1:].num_elements(), tf.reduce_prod(tf.shape(x)[1:]))
                          for x in like]
        else:
            self.sizes = [_static_or(x.shape.num_elements(), tf.size(x)) for x in like]

    def vec(self, xs):
        if self.batched:
            return tf.concat([tf.reshape(x, [tf.shape(x)[0], -1]) for x in xs], axis=1)
        return tf.concat([tf.reshape(x, [-1]) for x in xs], axis=0)

    def unvec(self, v):
        parts = tf.split(v, self.sizes, axis=-1) if len(self.sizes) > 1 else [v]
        return [tf.reshape(p, s) for p, s in zip(parts, self.shapes)]


def _static_or(static, dynamic):
    return dynamic if static is None else static


def _residual(func, z, base, h, t):
    """`z - base - h f(t, z)`: the stage equation's residual."""
    return [x - b - per_row(h, f) * f for x, b, f in zip(z, base, func(t, z))]


class AbstractImplicitSolver(AbstractSolver):
    """Base class of the ESDIRK solvers: a tableau whose diagonal is `gamma` after an
    explicit first stage, solved stage by stage with the simplified Newton iteration
    (see the module `tfaca._implicit`).

    Args:
        jacobian: `"auto"` (default), `"full"` or `"batch"`: which Jacobian of `func`
            the Newton iterations (and ACA's replay) invert. `"full"`: of the whole
            state flattened, `[N, N]`, `N` elements (cost: `N` vector-Jacobian products
            vectorized, and an `O(N^3)` inversion per step). `"batch"`: one `[d, d]`
            block per sample of the leading batch axis, for states whose samples do not
            interact (a neural ODE's batch): `batch` times cheaper to invert, but if
            the samples do interact, the Newton iterations converge slower and ACA's
            gradient is wrong. `"auto"`: `"batch"` with per-sample steps, else `"full"`.
        jac: optional `jac(t, y) -> J`, the Jacobian of `func` supplied by the user in
            the layout above: `y` is the state as that vector, its components (in
            `tf.nest.flatten` order) flattened and concatenated: `[N]` for `"full"`
            (a `[batch, d]` state with shared steps arrives as `[batch * d]`), or
            `[batch, d]` for `"batch"` (each sample's elements on the last axis); `J`
            is `[N, N]` or `[batch, d, d]`; `t` is a scalar, `[batch]` with per-sample
            steps. It must be exact where ACA's replay uses it (the converged
            stages). Read by the solver only: parameters it needs are closed over.
            Default: by automatic differentiation of `func`. In an `ODELayer`'s config
            it is saved as Keras saves functions: register it
            (`keras.saving.register_keras_serializable`) to load it back.
        kappa: the Newton iterations stop when their predicted remaining error is below
            `kappa` times the tolerances (`rtol`, `atol`): 0.01, as Hairer's RADAU5 and
            diffrax. Smaller: more iterations, stages closer to their equations.
        max_iterations: Newton iterations per stage before the trial fails (default
            10).
    """

    implicit = True
    hold_after_reject = True
    fsal = False  # the stage slopes are (z - base) / h; f(t1, y1) is evaluated afresh
    order = None
    error_order = None

    def __init__(self, jacobian="auto", jac=None, kappa=0.01, max_iterations=10):
        super().__init__()
        diagonal = self.tableau.a_diagonal
        if diagonal is None or len(set(diagonal[1:])) != 1 or diagonal[1] <= 0:
            raise ValueError(
                f"{type(self).__name__}.tableau must be an ESDIRK tableau: an explicit first "
                f"stage, then one positive diagonal entry. Received: a_diagonal={diagonal}")
        if jacobian not in _JACOBIANS:
            raise ValueError(f"`jacobian` must be one of {list(_JACOBIANS)}. "
                             f"Received: jacobian={jacobian!r}")
        if jac is not None and not callable(jac):
            raise TypeError(f"`jac` must be None or callable. Received: jac={jac!r}")
        if (not isinstance(kappa, numbers.Real) or isinstance(kappa, bool)
                or not 0 < kappa < 1):
            raise ValueError(f"`kappa` must be a number in (0, 1). Received: kappa={kappa!r}")
        if (not isinstance(max_iterations, numbers.Integral) or isinstance(max_iterations, bool)
                or max_iterations < 1):
            raise ValueError("`max_iterations` must be a positive int. "
                             f"Received: max_iterations={max_iterations!r}")
        self.jacobian, self.jac = jacobian, jac
        self.kappa, self.max_iterations = float(kappa), int(max_iterations)
        self._norm = None

    @property
    def gamma(self):
        return self.tableau.a_diagonal[1]

    def options(self):
        options = {"jacobian": self.jacobian, "kappa": self.kappa,
                   "max_iterations": self.max_iterations}
        if self.jac is not None:
            options["jac"] = self.jac
        return options

    def bind(self, controller):
        """A copy whose Newton iterations measure their corrections in `controller`'s
        scaled norm (its `rtol` and `atol`)."""
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound._norm = controller.error_ratio
        return bound

    # The loop counts `trial_fevals` for solvers whose trials cost a fixed number of
    # evaluations; an implicit trial returns its own count (`trial`).
    trial_fevals = 0
    dense_needs_f1 = True
    # Cubic Hermite from (y0, f0) and (y1, f1): the stages and f(t1, y1).
    dense_weights = property(lambda self: _hermite(self.tableau.b_sol, self.tableau.stages + 1))

    def trial(self, func, t0, y0, f0, dt):
        y1, y_error, k, fevals = self._step(func, t0, y0, f0, dt, replay=False, error=True)
        return y1, None, y_error, k, fevals

    def step(self, func, t0, y0, f0, dt, solution_only=False, return_stages=False):
        """One step (values; see `trial`, `replay_step`): `(y1, None, y_error)`, and the
        stages with `return_stages`."""
        y1, y_error, k, _ = self._step(func, t0, y0, f0, dt, replay=False,
                                       error=not solution_only)
        return (y1, None, y_error, k) if return_stages else (y1, None, y_error)

    def replay_step(self, func, t0, y0, f0, dt):
        return self._step(func, t0, y0, f0, dt, replay=True, error=False)[0]

    def replay_stages(self, func, t0, y0, f0, dt):
        y1, _, k, _ = self._step(func, t0, y0, f0, dt, replay=True, error=False)
        return y1, k

    # -- the step ------------------------------------------------------------------------

    def _layout(self, t0, y0):
        batched = self.jacobian == "batch" or (self.jacobian == "auto" and t0.shape.rank == 1)
        if t0.shape.rank == 1 and not batched:
            raise ValueError(
                'Per-sample steps solve each sample on its own: jacobian="full" would couple '
                'them. Use jacobian="auto" or "batch" with per_sample=True.')
        if batched and any(y.shape.rank is not None and y.shape.rank < 1 for y in y0):
            raise ValueError('jacobian="batch" needs a leading batch axis on every state '
                             "component. Received: a scalar component.")
        return _Layout(batched, y0)

    def _jacobian(self, func, t, y, layout):
        """`J = df/dy` at `(t, y)` in the layout, held constant (no gradient)."""
        v = tf.stop_gradient(layout.vec(y))
        t = tf.stop_gradient(t)
        if self.jac is not None:
            jacobian = self.jac(t, v)
            if not tf.is_tensor(jacobian):
                jacobian = tf.convert_to_tensor(jacobian, v.dtype)
            if jacobian.dtype != v.dtype or jacobian.shape.rank != 2 + int(layout.batched):
                raise ValueError(
                    f"`jac` must return the Jacobian as a {v.dtype.name} tensor of shape "
                    f"{'(batch, d, d)' if layout.batched else '(N, N)'} for the state as a "
                    f"vector of shape {tuple(v.shape)}. Received: {jacobian.dtype.name} of "
                    f"shape {tuple(jacobian.shape)}")
            return tf.stop_gradient(jacobian)
        # ACA's forward solve runs with tapes paused; this tape must record.
        with recording():
            with tf.GradientTape(persistent=tf.executing_eagerly()) as tape:
                tape.watch(v)
                fv = layout.vec(func(t, layout.unvec(v)))
                if layout.batched:
                    # Samples that do not interact: the Jacobian of the sum over the batch
                    # holds each sample's block ([d, batch, d]). (`batch_jacobian` does
                    # the same with a shape assertion, which XLA logs as ignored on every
                    # compile.)
                    fv = tf.reduce_sum(fv, axis=0)
            # Vectorized (pfor) in graphs; eagerly, pfor would trace a new function on
            # every call (slow, and TensorFlow warns of retracing): a loop of
            # vector-Jacobian products instead.
            jacobian = tape.jacobian(fv, v, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                     experimental_use_pfor=not tf.executing_eagerly())
            if layout.batched:
                jacobian = tf.transpose(jacobian, [1, 0, 2])
        return tf.stop_gradient(jacobian)

    def _factor(self, jacobian, h, layout):
        """`M^-1` for `M = I - h J`: inverted once, so that each of the step's Newton
        iterations is one matrix-vector product (XLA has no LU factorization to keep;
        its inverse is LU with partial pivoting inside)."""
        eye = tf.eye(tf.shape(jacobian)[-1], dtype=jacobian.dtype)
        scale = per_row(h, jacobian) if layout.batched else h
        return tf.linalg.inv(eye - scale * jacobian)

    @staticmethod
    def _solve(inverse, r, layout):
        """`M^-1 r` for the state-shaped list `r`."""
        return layout.unvec(tf.linalg.matvec(inverse, layout.vec(r)))

    def _newton(self, residual, z0, factors, layout, y0, per_sample):
        """Simplified Newton from `z0`: `(z, iterations, failed)`, `failed` `[G]`
        (a scalar with shared steps).

        The first correction is never taken as the last (but when it is at rounding
        level): its rate is unknown. (Hairer's RADAU5 guesses it from the previous
        iterations' rate; on Robertson's problem that let Kvaerno3 accept stages too far
        from converged, and its step sizes never settled.)"""
        norm = self._norm
        if norm is None:
            raise ValueError(f"{self!r} must be bound to a step-size controller (`bind`) "
                             "to measure its Newton corrections.")
        dtype = z0[0].dtype
        eps = float(tf.experimental.numpy.finfo(dtype.as_numpy_dtype).eps)
        kappa = self.kappa

        def small(delta, z):
            """Corrections at the rounding of `z`: converged, whatever their rate."""
            out = tf.constant(True)
            for d, x in zip(delta, z):
                ok = tf.abs(d) <= 16.0 * eps * tf.abs(x)
                axes = list(range(1 if per_sample else 0, ok.shape.rank))
                out &= tf.reduce_all(ok, axis=axes) if axes else ok
            return out

        def body(n, z, previous, converged, failed):
            delta = self._solve(factors, residual(z), layout)
            # The iteration's control is no function to differentiate (a zero correction's
            # norm has an infinite derivative, which backpropagation would turn into NaN).
            size = norm(y0, [tf.stop_gradient(x) for x in z],
                        [tf.stop_gradient(d) for d in delta])
            running = tf.logical_not(converged | failed)
            rate = size / tf.where(previous > 0, previous, tf.ones_like(previous))
            settled = small(delta, z) | tf.equal(size, 0)
            settled |= (n > 0) & (rate < 1.0) & (rate / tf.maximum(1.0 - rate, eps) * size
                                                 <= kappa)
            diverged = (n > 0) & (rate >= 1.0) & tf.logical_not(settled)
            z = [tf.where(per_row(running, x) if per_sample else running, x - d, x)
                 for x, d in zip(z, delta)]
            return (n + 1, z, tf.where(running, size, previous),
                    converged | (running & settled), failed | (running & diverged))

        shape = tf.shape(y0[0])[:1] if per_sample else []
        start = (tf.constant(0), list(z0), tf.zeros(shape, dtype), tf.zeros(shape, tf.bool),
                 tf.zeros(shape, tf.bool))
        n, z, _, converged, failed = tf.while_loop(
            lambda n, z, p, c, f: tf.reduce_any(tf.logical_not(c | f)), body, start,
            maximum_iterations=self.max_iterations)
        return z, n, failed | tf.logical_not(converged)

    def _step(self, func, t0, y0, f0, dt, *, replay, error):
        """`(y1, y_error, stages, fevals)`; `replay`: the stages as functions of the
        step's inputs by the implicit function theorem (module docstring)."""
        tableau, per_sample = self.tableau, t0.shape.rank == 1
        layout = self._layout(t0, y0)
        h = self.gamma * dt
        # A group that is done steps by 0: its stages are its start, slopes 0.
        h_safe = tf.where(tf.equal(h, 0), tf.ones_like(h), h)
        factors = self._factor(self._jacobian(func, t0, y0, layout), tf.stop_gradient(h), layout)
        y0_values = [tf.stop_gradient(y) for y in y0]
        k, fevals = [f0], tf.constant(0)
        failed = tf.zeros_like(t0, tf.bool)
        for c_i, a_i in zip(tableau.c[1:], tableau.a_lower):
            t_i = t0 + c_i * dt
            base = _weighted_sum(y0, dt, a_i, k)
            # Replayed, the iterations only find the stage's value (its derivative comes
            # from the implicit function theorem, `_implicit_stage`); otherwise they are
            # what naive backpropagation differentiates.
            if replay:
                base_n, h_n, t_n, slope = ([tf.stop_gradient(b) for b in base],
                                           tf.stop_gradient(h), tf.stop_gradient(t_i),
                                           [tf.stop_gradient(x) for x in k[-1]])
            else:
                base_n, h_n, t_n, slope = base, h, t_i, k[-1]
            guess = [b + per_row(h_n, kp) * kp for b, kp in zip(base_n, slope)]
            z, n, fail = self._newton(lambda z: _residual(func, z, base_n, h_n, t_n), guess,
                                      factors, layout, y0_values, per_sample)
            if replay:
                z = self._implicit_stage(func, [tf.stop_gradient(x) for x in z], base, h, t_i,
                                         layout)
            fevals += n
            failed |= fail
            k.append([(x - b) / per_row(h_safe, x) for x, b in zip(z, base)])
        y1 = _weighted_sum(y0, dt, tableau.b_sol, k)
        y_error = None
        if error:
            # A failed trial ends in NaN with an infinite error: adaptively it is rejected
            # and the step shrinks; a fixed step, which cannot be retried, fails the solve
            # as non-finite (the loop's check of every fixed step).
            spread = (lambda x: per_row(failed, x)) if per_sample else (lambda x: failed)
            nan = tf.constant(float("nan"), y1[0].dtype)
            y1 = [tf.where(spread(y), nan, y) for y in y1]
            if tableau.b_error is not None:
                inf = tf.constant(float("inf"), y1[0].dtype)
                y_error = [tf.where(spread(e), inf, e)
                           for e in _weighted_sum(None, dt, tableau.b_error, k)]
        return y1, y_error, k, fevals

    def _implicit_stage(self, func, z_star, base, h, t_i, layout):
        """The converged stage `z*` as the implicit function of `(base, h, t_i)` and what
        `func` reads (module docstring): value `z*`, derivative `-M*^-1 dr`."""
        factors = self._factor(self._jacobian(func, t_i, z_star, layout), tf.stop_gradient(h),
                               layout)
        r = _residual(func, z_star, base, h, t_i)
        correction = self._solve(factors, [x - tf.stop_gradient(x) for x in r], layout)
        return [x - c for x, c in zip(z_star, correction)]

    def __repr__(self):
        given = [f"{k}={v!r}" for k, v in self.options().items()
                 if v != {"jacobian": "auto", "kappa": 0.01, "max_iterations": 10}.get(k)]
        return f"{type(self).__name__}({', '.join(given)})"


class Kvaerno3(AbstractImplicitSolver):
    """Kværnø's ESDIRK 3(2): four stages (three implicit), L-stable, stiffly accurate.

    For stiff problems at loose tolerances (rtol ~1e-3 to 1e-5). Each trial step costs
    one Jacobian, one matrix inversion and, per implicit stage, 2-3 Newton iterations
    (one evaluation of `func` each). Dense output: cubic Hermite. Reference: A. Kværnø,
    "Singly diagonally implicit Runge–Kutta methods with an explicit first stage",
    BIT 44 (2004); coefficients as published there (10 digits, `gamma` the L-stable
    root of `6 g^3 - 18 g^2 + 9 g - 1`).
    """

    _g = 0.4358665215
    tableau = ButcherTableau(
        c=(0.0, 2 * _g, 1.0, 1.0),
        a_lower=(
            (_g,),
            (0.4905633884191082, 0.0735700900808919),
            (0.30880996997303606, 1.490563388254108, -1.2352398797271447),
        ),
        a_diagonal=(0.0, _g, _g, _g),
        b_sol=(0.30880996997303606, 1.490563388254108, -1.2352398797271447, _g),
        # b_sol - b_embedded, the embedded solution being the third stage (order 2).
        b_error=(0.30880996997303606 - 0.4905633884191082, 1.490563388254108 - 0.0735700900808919,
                 -1.2352398797271447 - _g, _g),
    )
    order = 3
    error_order = 2


class Kvaerno5(AbstractImplicitSolver):
    """Kværnø's ESDIRK 5(4): seven stages (six implicit), L-stable, stiffly accurate.

    For stiff problems at tighter tolerances (rtol 1e-5 and below), and the usual choice
    (diffrax's `Kvaerno5`). Each trial step costs one Jacobian, one matrix inversion and,
    per implicit stage, 2-3 Newton iterations. Dense output: cubic Hermite. Reference:
    A. Kværnø, BIT 44 (2004), coefficients as published there (`gamma = 0.26`).
    """

    tableau = ButcherTableau(
        c=(0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0),
        a_lower=(
            (0.26,),
            (0.13, 0.8403332099679081),
            (0.22371961478320504, 0.476755323197997, -0.06470895363112615),
            (0.16648564323248322, 0.1045001884159172, 0.03631482272098715,
             -0.13090704451073998),
            (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141,
             0.6194303907248068),
            (0.13659751177640292, 0.0, -0.05496908796538376, -0.04118626728321046,
             0.629933048990164, 0.06962479448202728),
        ),
        a_diagonal=(0.0,) + (0.26,) * 6,
        b_sol=(0.13659751177640292, 0.0, -0.05496908796538376, -0.04118626728321046,
               0.629933048990164, 0.06962479448202728, 0.26),
        # b_sol - b_embedded, the embedded solution being the sixth stage (order 4).
        b_error=(0.13659751177640292 - 0.13855640231268224, 0.0,
                 -0.05496908796538376 + 0.04245337201752043,
                 -0.04118626728321046 - 0.02446657898003141,
                 0.629933048990164 - 0.6194303907248068, 0.06962479448202728 - 0.26, 0.26),
    )
    order = 5
    error_order = 4
