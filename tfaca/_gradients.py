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
each accepted step (the stages `y_{i+1}` needs, and their vector-Jacobian products),
never the rejected trials.

Naive: differentiate through the whole loop, rejected trials and step-size selection
included, as the paper defines it. Memory O(trials * stages * state); the gradient also
carries the derivative of the step-size choice.

Adjoint (Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential
Equations", NeurIPS 2018): keep only the outputs and solve the adjoint system backwards
in time. Memory O(state), but the reverse solve of `y` drifts from the forward one
(Zhuang et al. 2020, Table 1, Fig. 4), and the gradient with it.

ACA and the adjoint define their gradient with `tf.custom_gradient`, in
`_solve_with_custom_gradient` only; every strategy runs the same loop, `_loop.integrate`.
"""

import dataclasses

import tensorflow as tf
from tensorflow.python.eager import record as tape_record

from tfaca._loop import integrate, raise_on_failure
from tfaca._solution import Stats


class AbstractGradient:
    """Base class of gradient strategies: `solve` returns a `Trajectory` whose `ys` carry
    the strategy's gradient."""

    name = None

    def options(self):
        """The constructor arguments, as a dict (empty for strategies without any)."""
        return {}

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
        trajectory = integrate(
            solver, controller, lambda t, y: func(t, y, args), ts, y0, record=False, **loop_kwargs
        )
        zero = tf.constant(0, tf.int32)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=zero))


def _zeros_if_none(grad, like):
    if grad is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(grad)


def _solve_with_custom_gradient(forward, backward, ts, y0, args):
    """Runs `forward` with no tape recording and gives its outputs `backward` as gradient.

    `forward(ts, y0, args) -> Trajectory`; `backward(trajectory, ts, y0, args, diff,
    g_ys, variables) -> (g_ts, g_y0, g_diff_args, g_vars)`, where `diff` lists the
    positions of the floating (differentiable) `args` and `g_diff_args` holds their
    gradients in that order. `tf.custom_gradient` lives only here.
    """
    num_y = len(y0)
    forward_result = []

    @tf.custom_gradient
    def solve(ts, *flat):
        y0, args = list(flat[:num_y]), list(flat[num_y:])
        # tf.custom_gradient does not stop outer tapes from recording the forward ops;
        # without this every trial step would be kept alive until the tape is released,
        # as memory-hungry as the naive method (tf.recompute_grad does the same).
        with tape_record.stop_recording():
            trajectory = forward(ts, y0, args)
        forward_result.append(trajectory)

        def grad(*g_ys, variables=None):
            g_ys = [_zeros_if_none(g, y) for g, y in zip(g_ys, trajectory.ys)]
            diff = [k for k, a in enumerate(args) if a.dtype.is_floating]
            g_ts, g_y0, g_diff_args, g_vars = backward(
                trajectory, ts, y0, args, diff, g_ys, list(variables or [])
            )
            g_args = [None] * len(args)
            for k, g in zip(diff, g_diff_args):
                g_args[k] = g
            if variables is None:
                return [g_ts] + g_y0 + g_args
            return [g_ts] + g_y0 + g_args, g_vars

        return trajectory.ys, grad

    ys = solve(ts, *y0, *args)
    return forward_result[0]._replace(ys=list(ys))


class ACAGradient(AbstractGradient):
    """The adaptive checkpoint adjoint: exact gradients of the accepted steps (default).

    Gradients reach `y0`, `args`, every entry of `ts`, and the variables that `func`
    reads (Keras weights included) through `tf.custom_gradient`. The backward pass
    evaluates `func` once per stage that the solution uses (6 for Dopri5 and Tsit5,
    whose seventh, FSAL, stage only serves the next step) per accepted step
    (`Stats.num_fevals_backward`).
    """

    name = "aca"

    def solve(self, solver, controller, func, ts, y0, args, **loop_kwargs):
        def forward(ts, y0, args):
            return integrate(
                solver, controller, lambda t, y: func(t, y, args), ts, y0, record=True,
                **loop_kwargs,
            )

        def backward(trajectory, ts, y0, args, diff, g_ys, variables):
            return _replay(
                solver, func, ts, args, diff, trajectory.checkpoints, g_ys, variables
            )

        trajectory = _solve_with_custom_gradient(forward, backward, ts, y0, args)
        stats = trajectory.stats
        replay_fevals = stats.num_steps * solver.tableau.solution_stages
        return trajectory._replace(stats=stats._replace(num_fevals_backward=replay_fevals))


def _replay(solver, func, ts, args, diff, checkpoints, g_ys, variables):
    """The ACA backward pass: pull the output cotangents back through the accepted steps."""
    diff_args = [args[k] for k in diff]

    def step_vjp(i, a, g_ts, g_args, g_vars):
        t = checkpoints.t[i]
        dt = checkpoints.dt[i]
        j = checkpoints.interval[i]
        hit = checkpoints.hit[i]
        y = [y_n[i] for y_n in checkpoints.y]
        # The output ts[j] is y_{i+1} when this step lands on it.
        a = [a_n + tf.where(hit, g[j], tf.zeros_like(a_n)) for a_n, g in zip(a, g_ys)]
        with tf.GradientTape() as tape:
            tape.watch([t, dt] + y + diff_args)
            f = lambda t_, y_: func(t_, y_, args)  # noqa: E731
            y1, _, _ = solver.step(f, t, y, f(t, y), dt, solution_only=True)
        sources = [t, dt, y, diff_args, list(variables)]
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
        [tf.zeros_like(a) for a in diff_args],
        [tf.zeros_like(v) for v in variables],
    )
    # parallel_iterations=1: each step's replay does not depend on the cotangent, so
    # TensorFlow would otherwise run up to 10 replays ahead and hold their graphs at
    # once; one at a time keeps ACA's memory at one step's graph (XLA ignores it).
    _, a, g_ts, g_diff_args, g_vars = tf.while_loop(
        lambda i, *_: i >= 0, step_vjp, state, parallel_iterations=1
    )
    g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
    return g_ts, g_y0, g_diff_args, g_vars


class AdjointGradient(AbstractGradient):
    """The continuous adjoint of Chen, Rubanova, Bettencourt & Duvenaud (NeurIPS 2018).

    Keeps only the outputs; the backward pass solves the augmented system
    `[y, a, g_args, g_vars]` backwards from each output time to the previous one,
    `dy/dt = f`, `da/dt = -a^T df/dy`, `dg/dt = -a^T df/d(args, variables)`, with the
    same solver. At each output time `y` is reset to the forward value and `a` receives
    that output's cotangent (as torchdiffeq does). Time gradients need no extra
    integral: `dL/dts[j] = <dL/dys[j], f(ts[j], ys[j])>` for `j >= 1` and
    `dL/dts[0] = -<a(ts[0]), f(ts[0], y0)>`.

    Memory O(state) in the number of steps, but the reverse solve of `y` drifts from
    the forward trajectory (Zhuang et al. 2020, Fig. 4), so the gradient is only as
    accurate as that reverse solve: the point of comparison for ACA.

    Args:
        rtol, atol: tolerances of the reverse solve (scalars); default: those of the
            forward solve (for parameter components, the smallest forward tolerance).
        max_steps: trial-step bound per output interval of the reverse solve; default:
            the forward's.

    Attributes:
        backward_stats: after a gradient has been computed with this instance, a
            `Stats` of the reverse solve (summed over output intervals).
    """

    name = "adjoint"

    def __init__(self, rtol=None, atol=None, max_steps=None):
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.backward_stats = None

    def options(self):
        return {"rtol": self.rtol, "atol": self.atol, "max_steps": self.max_steps}

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"

    def solve(self, solver, controller, func, ts, y0, args, **loop_kwargs):
        def forward(ts, y0, args):
            return integrate(
                solver, controller, lambda t, y: func(t, y, args), ts, y0, record=False,
                **loop_kwargs,
            )

        def backward(trajectory, ts, y0, args, diff, g_ys, variables):
            return self._reverse_solve(
                solver, controller, func, trajectory.ys, ts, y0, args, diff, g_ys, variables,
                loop_kwargs,
            )

        trajectory = _solve_with_custom_gradient(forward, backward, ts, y0, args)
        unknown = tf.constant(-1, tf.int32)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=unknown))

    def _reverse_solve(self, solver, controller, func, ys, ts, y0, args, diff, g_ys,
                       variables, loop_kwargs):
        diff_args = [args[k] for k in diff]
        params = diff_args + [tf.convert_to_tensor(v) for v in variables]
        num_y, num_p = len(y0), len(params)
        dtype = ts.dtype

        def augmented(t, state):
            y, a = state[:num_y], state[num_y:2 * num_y]
            with tf.GradientTape() as tape:
                tape.watch(y + diff_args)
                f = func(t, y, args)
            vjp = tape.gradient(
                f, [y, diff_args, variables], output_gradients=a,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            vjp = vjp[0] + vjp[1] + [tf.convert_to_tensor(g) for g in vjp[2]]
            return f + [-g for g in vjp]

        def tolerance(given, forward):
            if given is not None:
                return [tf.constant(given, dtype)] * (2 * num_y + num_p)
            smallest = tf.reduce_min(tf.stack([tf.reduce_min(x) for x in forward]))
            return forward + forward + [smallest] * num_p

        reverse_controller = dataclasses.replace(
            controller,
            rtol=tolerance(self.rtol, controller.rtol),
            atol=tolerance(self.atol, controller.atol),
        )
        kwargs = dict(loop_kwargs)
        if self.max_steps is not None:
            kwargs["max_steps"] = self.max_steps

        def interval(j, a, g_params, g_ts, num_steps, num_rejected, num_fevals, status, t_final):
            y_j = [y[j] for y in ys]
            a = [a_n + g[j] for a_n, g in zip(a, g_ys)]
            f_j = func(ts[j], y_j, args)
            g_ts = tf.tensor_scatter_nd_add(g_ts, [[j]], [_dot([g[j] for g in g_ys], f_j)])
            trajectory = integrate(
                solver, reverse_controller, augmented, tf.stack([ts[j], ts[j - 1]]),
                y_j + a + g_params, record=False, **kwargs,
            )
            end = [x[-1] for x in trajectory.ys]
            stats = trajectory.stats
            return (
                j - 1,
                end[num_y:2 * num_y],
                end[2 * num_y:],
                g_ts,
                num_steps + stats.num_steps,
                num_rejected + stats.num_rejected,
                num_fevals + stats.num_fevals + 1,
                tf.maximum(status, trajectory.status),
                tf.where(status == 0, trajectory.t_final, t_final),
            )

        zero = tf.constant(0, tf.int32)
        state = (
            tf.shape(ts)[0] - 1,
            [tf.zeros_like(y) for y in y0],
            [tf.zeros_like(p) for p in params],
            tf.zeros_like(ts),
            zero, zero, zero, zero, ts[-1],
        )
        _, a, g_params, g_ts, num_steps, num_rejected, num_fevals, status, t_final = tf.while_loop(
            lambda j, *_: j >= 1, interval, state, parallel_iterations=1
        )
        # ts[0]: moving the start with y0 fixed shifts the solution by -Phi f(t0, y0).
        g_ts = tf.tensor_scatter_nd_add(g_ts, [[0]], [-_dot(a, func(ts[0], y0, args))])
        g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
        self.backward_stats = Stats(num_steps, num_rejected, num_fevals + 1, zero)
        g_y0 = raise_on_failure(status, t_final, g_y0, "in the adjoint's reverse solve")
        return g_ts, g_y0, g_params[: len(diff_args)], g_params[len(diff_args):]


def _dot(xs, ys):
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


_GRADIENTS = {"aca": ACAGradient, "naive": NaiveGradient, "adjoint": AdjointGradient}


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
