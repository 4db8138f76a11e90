"""Explicit Runge–Kutta solvers: a tableau, its orders, and one generic step.

Every solver is data (a `ButcherTableau` plus its order and the order of its error
estimate); the arithmetic lives once, in `AbstractSolver.step`. States are flat lists of
tensors (the caller flattens nested structures), so the step is a handful of fused
multiply-adds per stage and never sees structures, tolerances or gradient strategies.
"""

import dataclasses
import numbers

import tensorflow as tf

from tfaca._tableau import ButcherTableau


def per_row(v, x, axis=0):
    """`v` laid out to scale `x` row by row: a scalar as it is; a `[batch]` vector (per-sample
    times and step sizes) reshaped to broadcast along `x`'s batch axis `axis`."""
    if v.shape.rank != 1 or x.shape.rank <= axis + 1:
        return v
    return tf.reshape(v, [1] * axis + [-1] + [1] * (x.shape.rank - axis - 1))


def _weighted_sum(y0, dt, weights, k):
    """`y0 + dt * sum_i weights[i] * k[i]` component by component, zero weights skipped at
    trace time; with `y0=None`, `dt * sum_i weights[i] * k[i]` (the error estimate).
    `dt` is a scalar, or `[batch]` (per-sample steps) scaling each sample's row."""
    out = []
    for n in range(len(k[0])):
        terms = [w * stage[n] for w, stage in zip(weights, k) if w != 0.0]
        increment = per_row(dt, k[0][n]) * tf.add_n(terms) if terms else tf.zeros_like(k[0][n])
        out.append(increment if y0 is None else y0[n] + increment)
    return out


def _hermite(b_sol, num_stages):
    """Cubic Hermite interpolation as stage weights (powers theta, theta**2, theta**3).

    The cubic through `y0, y1 = y0 + dt * sum_i b_sol[i] k[i]` with slopes
    `k[0] = f(t0, y0)` and `k[num_stages - 1] = f(t1, y1)`:
    `y0 + dt * [(3 theta^2 - 2 theta^3) sum_i b_sol[i] k[i] + (theta - 2 theta^2 + theta^3)
    k[0] + (theta^3 - theta^2) k[-1]]`. Third order (its error is O(dt^4)).
    """
    rows = []
    for i in range(num_stages):
        b = b_sol[i] if i < len(b_sol) else 0.0
        row = [0.0, 3.0 * b, -2.0 * b]
        if i == 0:
            row = [row[0] + 1.0, row[1] - 2.0, row[2] + 1.0]
        if i == num_stages - 1:
            row = [row[0], row[1] - 1.0, row[2] + 1.0]
        rows.append(tuple(row))
    return tuple(rows)


def _hermite_with_bubble(b_sol, d):
    """Hermite plus `theta^2 (1 - theta)^2 * dt * sum_i d[i] k[i]`: the form of Dormand and
    Prince's fourth-order extension (Hairer, Nørsett & Wanner I, II.6, `contd5`)."""
    hermite = _hermite(b_sol, len(b_sol))
    return tuple((h[0], h[1] + di, h[2] - 2.0 * di, di) for h, di in zip(hermite, d))


class AbstractSolver:
    """Base class of explicit Runge–Kutta solvers.

    A subclass sets three class attributes and inherits the step:

    - `tableau`: a `ButcherTableau`;
    - `order`: the order of the solution;
    - `error_order`: the order of the embedded solution used for the error estimate
      (it sets the exponent of the step-size controller), or `None` for a method with
      no error estimate, which then runs only with a fixed `step_size`.

    Example:

    ```python
    class Ralston(tfaca.AbstractSolver):
        tableau = tfaca.ButcherTableau(
            c=(0.0, 2 / 3), a_lower=((2 / 3,),), b_sol=(0.25, 0.75))
        order = 2
        error_order = None

    ys = tfaca.odeint(func, y0, ts, method=Ralston(), step_size=0.01)
    ```
    """

    tableau: ButcherTableau = None
    order: int = None
    error_order: int = None
    # Capabilities the gradient strategies check (never a solver's class): whether a step
    # is rebuilt from its start state alone (ACA's replay), and whether it can be undone
    # from its end (MALI).
    replayable = True
    invertible = False
    # Whether the stages are equations solved by Newton's method (`_implicit`), and whether
    # the step after a rejected trial may not grow (the loop's rule for such solvers).
    implicit = False
    hold_after_reject = False

    def __init__(self):
        if not isinstance(self.tableau, ButcherTableau):
            raise TypeError(
                f"{type(self).__name__}.tableau must be a ButcherTableau. "
                f"Received: {self.tableau!r}"
            )
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(
                f"{type(self).__name__}.order must be a positive int. Received: {self.order!r}"
            )
        if (self.error_order is None) != (self.tableau.b_error is None):
            raise ValueError(
                f"{type(self).__name__}: `error_order` and `tableau.b_error` must both be "
                f"set (adaptive) or both be None (fixed step). Received: "
                f"error_order={self.error_order!r}, b_error={self.tableau.b_error!r}"
            )
        if self.tableau.implicit and not self.implicit:
            raise ValueError(
                f"{type(self).__name__}.tableau has a non-zero `a_diagonal` (implicit "
                "stages), which the explicit step would ignore: subclass "
                "tfaca.AbstractImplicitSolver instead.")

    def bind(self, controller):
        """The solver as a solve with `controller` runs it: itself (an implicit solver
        takes the controller's tolerances for its Newton iterations)."""
        del controller
        return self

    def trial(self, func, t0, y0, f0, dt):
        """The loop's trial step: `(y1, f1, y_error, stages, fevals)`, `fevals` the
        evaluations of `func` it cost (`step` with `return_stages=True`)."""
        return (*self.step(func, t0, y0, f0, dt, return_stages=True), self.trial_fevals)

    def replay_step(self, func, t0, y0, f0, dt):
        """`y1` as ACA's replay differentiates it: the step's solution stages."""
        return self.step(func, t0, y0, f0, dt, solution_only=True)[0]

    @property
    def adaptive(self):
        return self.error_order is not None

    @property
    def fsal(self):
        """Whether `step` returns the derivative the next step starts from (`f1`), so
        that the loop carries it instead of evaluating `func` after an accepted step."""
        return self.tableau.fsal

    @property
    def trial_fevals(self):
        """Evaluations of `func` per trial step (the first stage is carried)."""
        return self.tableau.stages - 1

    def options(self):
        """The constructor arguments, as a dict (empty for solvers without any)."""
        return {}

    @property
    def dense_needs_f1(self):
        """Whether the continuous extension needs `f(t1, y1)` after the stages: the
        Hermite fallback of a tableau that is not FSAL (an FSAL tableau's last stage is
        `f(t1, y1)`)."""
        return self.tableau.b_dense is None and not self.tableau.fsal

    @property
    def dense_weights(self):
        """The continuous extension as a `[stages, degree]` nested tuple: entry `[i][p]` is
        the coefficient of `theta**(p + 1)` in the weight of stage `i` (`f(t1, y1)`
        appended as a last stage when `dense_needs_f1`). The tableau's own `b_dense`
        (Dopri5, Tsit5: fourth order), else cubic Hermite from `(y, f)` at both ends."""
        tableau = self.tableau
        if tableau.b_dense is not None:
            return tableau.b_dense
        return _hermite(tableau.b_sol, tableau.stages + int(self.dense_needs_f1))

    def dense_coefficients(self, dt, k):
        """The interpolating polynomial of one step: `y(t0 + theta dt) = y0 +
        sum_p theta**(p + 1) c[p]`.

        Args:
            dt: the step size.
            k: the stages `step(..., return_stages=True)` returned, followed by
                `f(t1, y1)` when `dense_needs_f1`; or all of them but the last,
                `f(t1, y1)`, whose term is then left out (ACA's replay carries it by the
                next step's first stage, the same value: `replay_stages`).

        Returns:
            A flat list, per state component, of `[degree, ...]` tensors `c`: one
            contraction of the stacked stages with the weights (a small matmul).
        """
        weights = self.dense_weights
        if len(k) not in (len(weights), len(weights) - 1):
            raise ValueError(f"{self!r} interpolates from {len(weights)} stages, got {len(k)}")
        out = []
        for n in range(len(k[0])):
            stages = tf.stack([stage[n] for stage in k])
            w = tf.constant(list(zip(*weights[:len(k)])), stages.dtype)  # [degree, stages]
            combined = tf.tensordot(w, stages, 1)  # [degree, ...]
            out.append(per_row(dt, combined, axis=1) * combined)
        return out

    def replay_stages(self, func, t0, y0, f0, dt):
        """`(y1, k)`: the step's end and the stages of its continuous extension but the
        last, which is always `f(t1, y1)` (an FSAL stage, or the Hermite slope), equal to
        the next step's first stage. ACA's replay rebuilds a step with these, so that a
        step with outputs inside costs no more evaluations than one without (for every
        built-in solver, the stages before `f(t1, y1)` are the ones `y1` uses)."""
        count = len(self.dense_weights) - 1
        k = self._stages(func, t0, y0, f0, dt, count)
        return _weighted_sum(y0, dt, self.tableau.b_sol[:count], k), k

    def _stages(self, func, t0, y0, f0, dt, count):
        """The first `count` stages from `(t0, y0)`, `f0` being the first."""
        tableau = self.tableau
        k = [f0]
        for c_i, a_i in zip(tableau.c[1:count], tableau.a_lower[: count - 1]):
            k.append(func(t0 + c_i * dt, _weighted_sum(y0, dt, a_i, k)))
        return k

    def step(self, func, t0, y0, f0, dt, solution_only=False, return_stages=False):
        """One step of the method from `(t0, y0)` with size `dt`.

        Args:
            func: `func(t, y) -> dy/dt` on flat lists of tensors.
            t0: scalar tensor, the start of the step (`[batch]` with per-sample steps).
            y0: flat list of state tensors at `t0`.
            f0: `func(t0, y0)`, passed in so the caller can reuse it (FSAL).
            dt: scalar tensor, the signed step size (`[batch]` with per-sample steps:
                sample `b`'s row of every state component steps by `dt[b]`).
            solution_only: compute `y1` alone, with only the stages it needs
                (`tableau.solution_stages`); returns `(y1, None, None)`. ACA's replay
                uses it: it saves the FSAL stage (one evaluation of seven for Dopri5).
            return_stages: also return the list of stages `k` (the FSAL one included),
                which `dense_coefficients` turns into the step's interpolant.

        Returns:
            `(y1, f1, y_error)`: the state at `t0 + dt`; `func(t0 + dt, y1)` when the
            tableau is FSAL (free, it is the last stage), else `None`; the local error
            estimate, or `None` for a method without one. Costs `stages - 1` calls of
            `func`.
        """
        tableau = self.tableau
        fsal = tableau.fsal and not solution_only
        # An FSAL tableau's last stage is f(t1, y1): build y1 once, then evaluate it there.
        stages = tableau.solution_stages if solution_only else tableau.stages - int(fsal)
        k = self._stages(func, t0, y0, f0, dt, stages)
        y1 = _weighted_sum(y0, dt, tableau.b_sol[:stages], k)
        if solution_only:
            return (y1, None, None, k) if return_stages else (y1, None, None)
        f1 = None
        if fsal:
            f1 = func(t0 + dt, y1)
            k.append(f1)
        y_error = None if tableau.b_error is None else _weighted_sum(None, dt, tableau.b_error, k)
        return (y1, f1, y_error, k) if return_stages else (y1, f1, y_error)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Euler(AbstractSolver):
    """Forward Euler: first order, one evaluation per step, fixed step only."""

    tableau = ButcherTableau(c=(0.0,), a_lower=(), b_sol=(1.0,))
    order = 1
    error_order = None


class Midpoint(AbstractSolver):
    """Explicit midpoint rule: second order, two evaluations per step, fixed step only."""

    tableau = ButcherTableau(c=(0.0, 0.5), a_lower=((0.5,),), b_sol=(0.0, 1.0))
    order = 2
    error_order = None


class RK4(AbstractSolver):
    """The classical fourth-order Runge–Kutta method: four evaluations, fixed step only."""

    tableau = ButcherTableau(
        c=(0.0, 0.5, 0.5, 1.0),
        a_lower=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b_sol=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    )
    order = 4
    error_order = None


class HeunEuler(AbstractSolver):
    """Heun's method with an embedded Euler step (RK12): 2nd order, error order 1.

    Two evaluations per trial step plus one per accepted step (not FSAL). The paper
    uses it, with `rtol = atol = 1e-2`, for its image classifiers: at loose tolerances a
    cheap low-order pair takes few steps.
    """

    tableau = ButcherTableau(
        c=(0.0, 1.0), a_lower=((1.0,),), b_sol=(0.5, 0.5), b_error=(-0.5, 0.5)
    )
    order = 2
    error_order = 1


class Bosh3(AbstractSolver):
    """Bogacki–Shampine 3(2) (RK23, as MATLAB's ode23): three evaluations per step, FSAL.

    Reference: Bogacki & Shampine, "A 3(2) pair of Runge–Kutta formulas",
    Appl. Math. Lett. 2 (1989).
    """

    tableau = ButcherTableau(
        c=(0.0, 0.5, 0.75, 1.0),
        a_lower=((0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)),
        b_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
        # b_sol - b_embedded with b_embedded = (7/24, 1/4, 1/3, 1/8).
        b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    )
    order = 3
    error_order = 2


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
# Dormand & Prince's dense-output weights (Hairer, Nørsett & Wanner I, II.6, `contd5`).
_DOPRI5_D = (
    -12715105075 / 11282082432,
    0.0,
    87487479700 / 32700410799,
    -10690763975 / 1880347072,
    701980252875 / 199316789632,
    -1453857185 / 822651844,
    69997945 / 29380423,
)


# b_sol - b_embedded for each 4th-order embedded solution Dopri5 can estimate its error
# with: Dormand and Prince's own (1980), and Shampine's (1986).
_DOPRI5_ERRORS = {
    "dormand_prince": (
        35 / 384 - 5179 / 57600,
        0.0,
        500 / 1113 - 7571 / 16695,
        125 / 192 - 393 / 640,
        -2187 / 6784 + 92097 / 339200,
        11 / 84 - 187 / 2100,
        -1 / 40,
    ),
    "shampine": (
        35 / 384 - 1951 / 21600,
        0.0,
        500 / 1113 - 22642 / 50085,
        125 / 192 - 451 / 720,
        -2187 / 6784 + 12231 / 42400,
        11 / 84 - 649 / 6300,
        -1 / 60,
    ),
}


class Dopri5(AbstractSolver):
    """Dormand–Prince 5(4) (RK45, as MATLAB's ode45): six evaluations per step, FSAL.

    The default: a good balance of cost and accuracy for neural ODEs at the usual
    tolerances. Dense output: Dormand and Prince's fourth-order continuous extension
    (cubic Hermite plus a quartic correction), free from the step's seven stages.
    Reference: Dormand & Prince, "A family of embedded Runge–Kutta formulae",
    J. Comp. Appl. Math. 6 (1980).

    Args:
        error_estimate: the embedded 4th-order solution the local error is measured
            against. `"dormand_prince"` (the default): Dormand and Prince's own, as
            Hairer's DOPRI5, scipy's RK45, MATLAB's ode45 and the ACA paper's code
            (TorchDiffEqPack). `"shampine"`: Shampine's ("Some practical Runge–Kutta
            formulas", Math. Comp. 46, 1986), as torchdiffeq and diffrax: same steps as
            those libraries at the same tolerances. The solution is the same 5th-order one;
            the estimates differ in size: Shampine's usually lets the controller take
            fewer steps, not always at the same accuracy (the neural-CDE benchmark: 20/4
            accepted/rejected steps against 25/8 on smooth data, 84/32 against 93/77 on
            noisy data with a loss 10 times further off).
    """

    tableau = ButcherTableau(
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a_lower=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        b_sol=_DOPRI5_B,
        b_error=_DOPRI5_ERRORS["dormand_prince"],
        b_dense=_hermite_with_bubble(_DOPRI5_B, _DOPRI5_D),
    )
    order = 5
    error_order = 4

    def __init__(self, error_estimate="dormand_prince"):
        if error_estimate not in _DOPRI5_ERRORS:
            raise ValueError(
                f"`error_estimate` must be one of {sorted(_DOPRI5_ERRORS)}. "
                f"Received: error_estimate={error_estimate!r}")
        self.error_estimate = error_estimate
        self.tableau = dataclasses.replace(type(self).tableau,
                                           b_error=_DOPRI5_ERRORS[error_estimate])
        super().__init__()

    def options(self):
        return {"error_estimate": self.error_estimate}

    def __repr__(self):
        if self.error_estimate == "dormand_prince":
            return "Dopri5()"
        return f"Dopri5(error_estimate={self.error_estimate!r})"


def _expand(*factors):
    """The coefficients (powers 1, 2, ...) of a product of polynomials given by their
    coefficients in increasing powers (the published factored form of Tsit5's weights)."""
    out = [1.0]
    for factor in factors:
        product = [0.0] * (len(out) + len(factor) - 1)
        for i, a in enumerate(out):
            for j, b in enumerate(factor):
                product[i + j] += a * b
        out = product
    if out[0] != 0.0:
        raise ValueError(f"A weight b_i(theta) must vanish at theta=0. Received: {out}")
    return tuple(out[1:])


class Tsit5(AbstractSolver):
    """Tsitouras 5(4): six evaluations per step, FSAL; often a little cheaper than Dopri5.

    Dense output: Tsitouras' fourth-order continuous extension from the seven stages.
    Reference: Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first
    column simplifying assumption", Comput. Math. Appl. 62 (2011). Coefficients as
    published there, to double precision.
    """

    _b = (
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
    )
    tableau = ButcherTableau(
        c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
        a_lower=(
            (0.161,),
            (-0.008480655492356989, 0.335480655492357),
            (2.897153057105493, -6.359448489975075, 4.3622954328695815),
            (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
            (
                5.86145544294642,
                -12.92096931784711,
                8.159367898576159,
                -0.071584973281401,
                -0.028269050394068383,
            ),
            _b,
        ),
        b_sol=_b + (0.0,),
        # b_sol - b_embedded, from the published b_embedded.
        b_error=(
            0.09646076681806523 - 0.09468075576583945,
            0.01 - 0.009183565540343254,
            0.4798896504144996 - 0.4877705284247616,
            1.379008574103742 - 1.234297566930479,
            -3.290069515436081 + 2.7077123499835256,
            2.324710524099774 - 1.866628418170587,
            -1 / 66,
        ),
        # Tsitouras (2011), the interpolant's weights b_i(theta) in factored form.
        b_dense=(
            _expand([0, -1.0530884977290216], [-1.3299890189751412, 1],
                    [0.7139816917074209, -1.4364028541716351, 1]),
            _expand([0, 0, 0.1017], [1.2949852507374631, -2.1966568338249754, 1]),
            _expand([0, 0, 2.490627285651252793], [1.57803468208092486, -2.38535645472061657, 1]),
            _expand([0, 0, -16.54810288924490272], [-1.21712927295533244, 1],
                    [-0.61620406037800089, 1]),
            _expand([0, 0, 47.37952196281928122], [-1.203071208372362603, 1],
                    [-0.658047292653547382, 1]),
            _expand([0, 0, -34.87065786149660974], [-1.2, 1], [-0.666666666666666667, 1]),
            _expand([0, 0, 2.5], [-1, 1], [-0.6, 1]),
        ),
    )
    order = 5
    error_order = 4


class ALF(AbstractSolver):
    """Asynchronous leapfrog (ALF), the invertible integrator of MALI.

    The state is augmented with `v`, an approximation of `dy/dt` that the solver carries
    from step to step (it starts as `v0 = func(t0, y0)`). One step of size `h`, with
    one evaluation of `func` (Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory
    efficient and reverse accurate integrator for Neural ODEs", ICLR 2021, Algorithm 2):

        k = y + v h/2;  u = func(t + h/2, k);  v' = v + 2 damping (u - v);
        y' = k + v' h/2

    Its inverse (`inverse`) rebuilds `(y, v)` from `(y', v')` with one evaluation too:
    `k = y' - v' h/2; u = func(t + h/2, k); v = (v' - 2 damping u) / (1 - 2 damping);
    y = k - v h/2`. That is what lets `gradient="mali"` keep no states: the backward
    pass walks the accepted steps back from the end of the solve.

    Second order in `y` with `damping=1` (the default, the reference code's); a damping
    below 1 pulls `v` towards `func` each step, which damps the oscillation of `v` the
    undamped method can carry on stiff problems, at first order. The inverse divides by
    `1 - 2 damping`, so `damping` near 0.5 magnifies rounding in the rebuilt states
    (0.5 itself is not invertible and refused). The local error estimate is
    `h (u - v)`, of first order (`error_order=1`), under the same step-size controller as
    the Runge–Kutta pairs; with `step_size` it runs as the fixed-step form. Dense output:
    cubic Hermite from `(y, v)` at both ends of a step.

    Args:
        damping: the damping factor, in (0, 1] and not 0.5.
    """

    order = 2
    error_order = 1

    def __init__(self, damping=1.0):
        if (not isinstance(damping, numbers.Real) or isinstance(damping, bool)
                or not 0 < damping <= 1 or damping == 0.5):
            raise ValueError(
                "`damping` must be a number in (0, 1] other than 0.5 (where the step is not "
                f"invertible). Received: damping={damping!r}")
        self.damping = float(damping)

    fsal = True
    trial_fevals = 1
    dense_needs_f1 = False
    replayable = False
    invertible = True
    # y1 = y0 + h (v0 + v1) / 2: the stages are (v0, v1), the slopes at both ends.
    dense_weights = _hermite((0.5, 0.5), 2)

    def options(self):
        return {"damping": self.damping}

    def _v1(self, v, u):
        if self.damping == 1.0:
            return 2.0 * u - v
        return v + 2.0 * self.damping * (u - v)

    def step(self, func, t0, y0, f0, dt, solution_only=False, return_stages=False):
        """One ALF step from `(t0, y0)` with `f0` the carried `v`; returns
        `(y1, v1, y_error)` (and the stages `[v0, v1]` with `return_stages`)."""
        half = 0.5 * dt
        k = [y + per_row(half, v) * v for y, v in zip(y0, f0)]
        u = func(t0 + half, k)
        v1 = [self._v1(v, u_n) for v, u_n in zip(f0, u)]
        y1 = [k_n + per_row(half, v) * v for k_n, v in zip(k, v1)]
        y_error = None if solution_only else [per_row(dt, u_n) * (u_n - v)
                                              for u_n, v in zip(u, f0)]
        return (y1, v1, y_error, [list(f0), v1]) if return_stages else (y1, v1, y_error)

    def inverse(self, func, t0, y1, v1, dt):
        """The step's inverse: `(y0, v0)` from its end `(y1, v1)`, with `t0` its start and
        `dt` its size (one evaluation of `func`, at the step's midpoint)."""
        k = self.midpoint(y1, v1, dt)
        return self.start(k, func(t0 + 0.5 * dt, k), v1, dt)

    @staticmethod
    def midpoint(y1, v1, dt):
        """The midpoint `k = y1 - v1 dt/2` of the step that ended at `(y1, v1)`."""
        half = 0.5 * dt
        return [y - per_row(half, v) * v for y, v in zip(y1, v1)]

    def start(self, k, u, v1, dt):
        """The step's start `(y0, v0)` from its midpoint `k`, `u = func(t0 + dt/2, k)` and
        its end's `v1`."""
        if self.damping == 1.0:
            v0 = [2.0 * u_n - v for u_n, v in zip(u, v1)]
        else:
            lam = self.damping
            v0 = [(v - 2.0 * lam * u_n) / (1.0 - 2.0 * lam) for u_n, v in zip(u, v1)]
        half = 0.5 * dt
        return [k_n - per_row(half, v) * v for k_n, v in zip(k, v0)], v0

    def replay_stages(self, func, t0, y0, f0, dt):
        raise NotImplementedError("ALF steps are replayed by the MALI gradient only.")

    def __repr__(self):
        return f"ALF(damping={self.damping})" if self.damping != 1.0 else "ALF()"
