"""Gradient strategies: how the derivative of a solve with respect to its inputs is found.

ACA, the adaptive checkpoint adjoint (Zhuang, Dvornek, Li, Tatikonda, Papademetris &
Duncan, "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural ODE",
ICML 2020):

- forward: run the adaptive loop with nothing recorded on the tape; keep, for each
  accepted step `i`, only its start `(t_i, dt_i, y_i)` (the checkpoints);
- backward, for `i = N - 1 ... 0`: add the cotangent of any output that step `i` lands
  on, rebuild `y_{i+1} = step(t_i, y_i, dt_i)` under a local `tf.GradientTape` and pull
  the cotangent `a` back through it: `a <- a^T dy_{i+1}/dy_i`, and accumulate
  `a^T dy_{i+1}/d(args, variables, t_i, dt_i)`; the local graph is dropped after each step.

The result is the exact gradient of the discrete map `y0 -> y(ts)` made of the accepted
steps, with their sizes held fixed ("discretise-then-optimise"). Within the output
interval `[ts[j-1], ts[j]]` a step starts at `t_i = ts[j-1] + (fixed offset)` and the
step that lands on `ts[j]` has size `ts[j] - t_i`; that is how the gradient reaches `ts`.
Costs: memory O(N * state) for the checkpoints plus one step's graph; time one replay of
each accepted step (`stages` evaluations of `func` and their vector-Jacobian products),
never the rejected trials.

Naive: differentiate through the whole loop, rejected trials and step-size selection
included, as the paper defines it. Memory O(trials * stages * state); the gradient also
carries the (meaningless) derivative of the step-size choice.
"""

import tensorflow as tf
from tensorflow.python.eager import record as tape_record

from tfaca._loop import integrate


class AbstractGradient:
    """Base class of gradient strategies: `solve` returns a `Trajectory` whose `ys` carry
    the strategy's gradient."""

    name = None

    def solve(self, solver, controller, func, ts, y0, args, **loop_kwargs):
        """Integrates `func(t, y, args)` (flat lists) and returns a `Trajectory`."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class NaiveGradient(AbstractGradient):
    """Backpropagate through every operation of the solver (the paper's "naive" method).

    Exact for what the forward computes, including how the step sizes depend on the
    inputs, but the tape holds every trial step: use it for comparison, not training.
    """

    name = "naive"

    def solve(self, solver, controller, func, ts, y0, args, **loop_kwargs):
        return integrate(
            solver, controller, lambda t, y: func(t, y, args), ts, y0, record=False, **loop_kwargs
        )


def _zeros_if_none(grad, like):
    if grad is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(grad)


class ACAGradient(AbstractGradient):
    """The adaptive checkpoint adjoint: exact gradients of the accepted steps (default).

    Gradients reach `y0`, `args`, every entry of `ts`, and the variables that `func`
    reads (Keras weights included) through `tf.custom_gradient`.
    """

    name = "aca"

    def solve(self, solver, controller, func, ts, y0, args, **loop_kwargs):
        num_y = len(y0)
        forward_result = []

        @tf.custom_gradient
        def forward(ts, *flat):
            y0, args = list(flat[:num_y]), list(flat[num_y:])
            # tf.custom_gradient does not stop outer tapes from recording the forward
            # ops; without this, every trial step would be kept alive until the tape
            # is released, as memory-hungry as the naive method (tf.recompute_grad
            # does the same).
            with tape_record.stop_recording():
                trajectory = integrate(
                    solver, controller, lambda t, y: func(t, y, args), ts, y0, record=True,
                    **loop_kwargs,
                )
            forward_result.append(trajectory)

            def grad(*g_ys, variables=None):
                g_ys = [_zeros_if_none(g, y) for g, y in zip(g_ys, trajectory.ys)]
                g_ts, g_y0, g_args, g_vars = _replay(
                    solver, func, ts, args, trajectory.checkpoints, g_ys, variables or []
                )
                if variables is None:
                    return [g_ts] + g_y0 + g_args
                return [g_ts] + g_y0 + g_args, g_vars

            return trajectory.ys, grad

        ys = forward(ts, *y0, *args)
        return forward_result[0]._replace(ys=list(ys))


def _replay(solver, func, ts, args, checkpoints, g_ys, variables):
    """The ACA backward pass: pull the output cotangents back through the accepted steps."""
    diff_args = [i for i, a in enumerate(args) if a.dtype.is_floating]

    def step_vjp(i, a, g_ts, g_args, g_vars):
        t = checkpoints.t[i]
        dt = checkpoints.dt[i]
        j = checkpoints.interval[i]
        hit = checkpoints.hit[i]
        y = [y_n[i] for y_n in checkpoints.y]
        # The output ts[j] is y_{i+1} when this step lands on it.
        a = [a_n + tf.where(hit, g[j], tf.zeros_like(a_n)) for a_n, g in zip(a, g_ys)]
        with tf.GradientTape() as tape:
            tape.watch([t, dt] + y + [args[k] for k in diff_args])
            f = lambda t_, y_: func(t_, y_, args)  # noqa: E731
            y1, _, _ = solver.step(f, t, y, f(t, y), dt)
        sources = [t, dt, y, [args[k] for k in diff_args], list(variables)]
        g_t, g_dt, g_y, g_a, g_v = tape.gradient(
            y1, sources, output_gradients=a, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        # t_i = ts[j-1] + offset; the landing step's dt = ts[j] - t_i.
        g_dt = tf.where(hit, g_dt, tf.zeros_like(g_dt))
        g_ts = tf.tensor_scatter_nd_add(g_ts, [[j - 1], [j]], tf.stack([g_t - g_dt, g_dt]))
        g_args = [x + tf.convert_to_tensor(y_) for x, y_ in zip(g_args, g_a)]
        g_vars = [x + tf.convert_to_tensor(y_) for x, y_ in zip(g_vars, g_v)]
        return i - 1, g_y, g_ts, g_args, g_vars

    state = (
        checkpoints.num_steps - 1,
        [tf.zeros_like(g[0]) for g in g_ys],
        tf.zeros_like(ts),
        [tf.zeros_like(args[k]) for k in diff_args],
        [tf.zeros_like(v) for v in variables],
    )
    _, a, g_ts, g_diff_args, g_vars = tf.while_loop(
        lambda i, *_: i >= 0, step_vjp, state
    )
    g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
    g_args = [None] * len(args)
    for k, g in zip(diff_args, g_diff_args):
        g_args[k] = g
    return g_ts, g_y0, g_args, g_vars


_GRADIENTS = {"aca": ACAGradient, "naive": NaiveGradient}


def get_gradient(gradient):
    """Returns a strategy from a name ("aca", "naive"), a strategy class, or an instance."""
    if isinstance(gradient, AbstractGradient):
        return gradient
    if isinstance(gradient, type) and issubclass(gradient, AbstractGradient):
        return gradient()
    if isinstance(gradient, str) and gradient.lower() in _GRADIENTS:
        return _GRADIENTS[gradient.lower()]()
    raise ValueError(
        f"`gradient` must be one of {sorted(_GRADIENTS)} or an AbstractGradient. "
        f"Received: gradient={gradient!r}"
    )
