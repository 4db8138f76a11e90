"""Naive backpropagation through every operation of the solver (the paper's "naive"
method): the point of comparison, not a training mode."""

import tensorflow as tf

from tfaca._gradients._base import AbstractGradient, run_forward


class NaiveGradient(AbstractGradient):
    """Backpropagate through every operation of the solver (the paper's "naive" method).

    Exact for what the forward computes, including how the step sizes depend on the
    inputs, but the tape holds every trial step: use it for comparison, not training.
    """

    name = "naive"
    supports_events = True

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        del jit  # never compiled on its own (`_jit.decide`)
        trajectory = run_forward(
            solver, controller, lambda t, y: func(t, y, args), plan, y0, record=False,
            loop_kwargs=dict(loop_kwargs, per_sample=per_sample), args=args,
        )
        zero = tf.zeros_like(trajectory.stats.num_steps)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=zero))


