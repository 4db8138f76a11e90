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
steps, with their sizes held fixed ("discretise-then-optimise"). Within an interval
`[s_{j-1}, s_j]` between the times the loop steps onto (the output times, or only the
start and the end when outputs are interpolated), a step starts at
`t_i = s_{j-1} + (fixed offset)` and the step that lands on `s_j` has size `s_j - t_i`;
that is how the gradient reaches the start and the end. An interpolated output at time
`tau` in step `i` is `y_i + sum_p theta^p c_{i,p}` with `theta = (tau - t_i) / dt_i`:
its cotangent reaches `y_i`, the step's interpolation coefficients (replayed with the
step) and, through the polynomial's derivative, `tau`, `t_i` and `dt_i`
(`_outputs.pullback`).
Costs: memory O(N * state) for the checkpoints (with interpolated outputs, also the
`degree` coefficients of each step's interpolant: 4 states per step for Dopri5 and
Tsit5, 3 for Hermite) plus one step's graph; time one replay of each accepted step (the
stages `y_{i+1}` needs, and their vector-Jacobian products; with interpolated outputs
the same stages serve the interpolant, whose last stage `f(t_{i+1}, y_{i+1})` is the
next step's first, plus one evaluation at the end of the solve), never the rejected
trials. The replay also checks that each rebuilt `y_{i+1}` is the one the forward pass
accepted: a `func` that is not a function of `(t, y)` alone (it
draws random numbers, or reads state that changed) would otherwise give the gradient
of another computation than the one whose loss was taken.

Second derivatives (Hessian-vector products, gradient penalties): when a tape records
the backward pass, ACA differentiates the accepted steps rebuilt from `y0` instead of
the constant checkpoints, so the gradient is itself exactly differentiable (memory then
grows with every accepted step's graph, as backprop through the accepted steps would).

Naive: differentiate through the whole loop, rejected trials and step-size selection
included, as the paper defines it. Memory O(trials * stages * state); the gradient also
carries the derivative of the step-size choice.

Adjoint (Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential
Equations", NeurIPS 2018): keep only the outputs and solve the adjoint system backwards
in time. Memory O(state), but the reverse solve of `y` drifts from the forward one
(Zhuang et al. 2020, Table 1, Fig. 4), and the gradient with it. Its gradient cannot be
differentiated again: doing so raises.

What `func` depends on reaches the gradient whichever way it comes in: `args`, the
variables it reads (found by a `VariableWatcher`, as `tf.custom_gradient` does), and
tensors it closes over that a tape is watching (found by tracing `func` once into a
scratch graph and listing its captures, the idea of JAX's `closure_convert`). All of
them become explicit inputs of the one `tf.custom_gradient`, in
`_solve_with_custom_gradient`; no variable handle passes through it, which is what
lets a solve sit inside a `tf.while_loop` (a Keras RNN cell, `tf.scan`) and still be
differentiated. Every strategy runs the same loop, `_loop.integrate`.
"""

import dataclasses
import math
import numbers

import tensorflow as tf
from tensorflow.python.eager import record as tape_record
from tensorflow.python.framework import func_graph
from tensorflow.python.ops import cond_v2, resource_variable_ops, while_v2

from tfaca import _outputs
from tfaca._control import StepSizeController
from tfaca._jit import compiled, scratch_trace
from tfaca._loop import (
    Checkpoints, graph_assert, in_xla_context, integrate, raise_on_failure,
)
from tfaca._solution import Stats
from tfaca._solvers import ALF, _weighted_sum, per_row


class AbstractGradient:
    """Base class of gradient strategies: `solve` returns a `Trajectory` whose `ys` carry
    the strategy's gradient."""

    name = None

    def options(self):
        """The constructor arguments, as a dict (empty for strategies without any)."""
        return {}

    def solve(self, solver, controller, func, plan, y0, args, *, throw=True, jit=False,
              **loop_kwargs):
        """Integrates `func(t, y, args)` (flat lists) and returns a `Trajectory` whose `ys`
        are the outputs that `plan` (an `_outputs.Plan`) asks for.

        `throw=False`: failures in the backward pass make the gradients NaN instead of
        raising (the forward's status is the caller's to report). `jit`: run the loops
        as functions compiled with XLA (`_jit.compiled`: False, True, or an eager
        call's key under which they are reused)."""
        raise NotImplementedError

    def __repr__(self):
        given = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if v is not None)
        return f"{type(self).__name__}({given})"


def _run(solver, controller, f, plan, y0, *, record, loop_kwargs):
    """The forward solve of every strategy: the loop over the plan's stops, and the
    outputs read from the accepted steps' interpolants when the plan interpolates."""
    trajectory = integrate(
        solver, controller, f, plan.stops, y0, record=record, dense=plan.dense, **loop_kwargs
    )
    if plan.dense:
        later = _outputs.evaluate(trajectory.checkpoints, _sample_times(plan.ts, y0, loop_kwargs),
                                  trajectory.t_final, _outputs.direction(plan))
        ys = [tf.concat([y[None], out], axis=0) for y, out in zip(y0, later)]
        trajectory = trajectory._replace(ys=ys)
    return trajectory


def _sample_times(ts, y0, loop_kwargs):
    """Output times as the per-sample steps' interpolation reads them, `[batch, n]`
    (shared times broadcast); else as they are."""
    if not loop_kwargs.get("per_sample") or ts.shape.rank == 2:
        return ts
    return tf.broadcast_to(ts, tf.stack([tf.shape(y0[0])[0], tf.shape(ts)[0]]))


def _times(plan):
    """The time tensors a solve's gradient is taken for: the stops, and the interpolated
    output times when there are any."""
    return [plan.stops] + ([plan.ts] if plan.dense else [])


def _plan(times):
    """The plan whose `_times` are `times`."""
    return _outputs.Plan(stops=times[0], ts=times[1] if len(times) > 1 else None)


# The functions a strategy compiles (`_jit.compiled`) take every tensor that changes from
# one call to the next as an argument, never closed over, so that eager calls can reuse
# them: the controller and loop options as one `options` argument (its Python values,
# `max_steps` say, key the function's traces), the `args` (and with them the floating
# ones among the `sources`), the times. What they close over is fixed by `jit`'s key:
# `func` and the tensors it closes over, the solver, the strategy's options.


def _options(controller, loop_kwargs):
    """The controller and the loop's options as a compiled function's argument."""
    fields = {f.name: getattr(controller, f.name) for f in dataclasses.fields(controller)}
    return {"controller": fields, "loop": dict(loop_kwargs)}


def _unpack(options):
    return StepSizeController(**options["controller"]), dict(options["loop"])


def _sources_with(sources, args):
    """`sources` (the floating `args`, then the tensors `func` closes over) with the
    floating entries of `args` in place of the first ones."""
    floating = [a for a in args if a.dtype.is_floating]
    return floating + list(sources[len(floating):])


def _forward(solver, func, jit, *, record, states=None, checkpoints=True):
    """The forward solve as `forward(times, y0, args, options)`, compiled when `jit`:
    keeping `states` (`integrate`) when it records, and dropping the checkpoints from the
    result unless `checkpoints`."""

    def run(times, y0, args, options):
        controller, loop_kwargs = _unpack(options)
        if record and states is not None:
            loop_kwargs["states"] = states
        trajectory = _run(solver, controller, lambda t, y: func(t, y, args), _plan(times), y0,
                          record=record, loop_kwargs=loop_kwargs)
        return trajectory if checkpoints else trajectory._replace(checkpoints=None)

    return compiled(run, jit, ("forward", record, states, checkpoints))


class NaiveGradient(AbstractGradient):
    """Backpropagate through every operation of the solver (the paper's "naive" method).

    Exact for what the forward computes, including how the step sizes depend on the
    inputs, but the tape holds every trial step: use it for comparison, not training.
    """

    name = "naive"

    def solve(self, solver, controller, func, plan, y0, args, *, throw=True, jit=False,
              **loop_kwargs):
        del jit  # never compiled on its own (`_jit.decide`)
        trajectory = _run(
            solver, controller, lambda t, y: func(t, y, args), plan, y0, record=False,
            loop_kwargs=loop_kwargs,
        )
        zero = tf.zeros_like(trajectory.stats.num_steps)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=zero))


def _zeros_if_none(grad, like):
    if grad is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(grad)


def _unique(items):
    """Distinct objects (by identity), in order of first appearance."""
    seen, out = set(), []
    for x in items:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


def _probe(func, times, y0, args, t_shape=()):
    """What `func` reads besides its arguments: `(sources, handles)`.

    `func` is traced once into a scratch graph (nothing runs) and the outer tensors it
    captured are listed. `sources`: the floating ones that a tape or accumulator would
    differentiate (constants cost nothing); `handles`: the eager resource handles of the
    variables it reads. Skipped eagerly when nothing records. A `func` that cannot be
    traced (it calls `.numpy()`) has none found: it could not run in a graph either.
    """
    if tf.executing_eagerly() and not tape_record.could_possibly_record():
        return [], []
    graph = scratch_trace(func, times[0].dtype, y0, args, t_shape)
    if graph is None:
        return [], []
    known = {id(x) for x in [*times, *y0, *args]}
    captures = graph.external_captures
    sources = [
        c
        for c in captures
        if c.dtype.is_floating and id(c) not in known and tape_record.should_record_backprop([c])
    ]
    handles = [c for c in captures if c.dtype == tf.resource and hasattr(c, "numpy")]
    return sources, handles


def _route_handles_through_forward_graphs(handles):
    """Lets the backward pass read variables inside the gradient of a `tf.while_loop` or
    of a `tf.cond` branch.

    When a solve sits in a loop body (a Keras RNN cell, `tf.scan`) or a `tf.cond`
    branch, its backward pass is built inside TensorFlow's while- or cond-gradient
    graph, and `func` reads its variables by their eager handles there. TensorFlow 2.21
    captures an eager handle into such a graph directly and then fails: a while
    gradient with "in list of internal_captures but not in internal_capture_to_output",
    a cond gradient with "Tensor.graph is undefined when eager execution is enabled"
    (tensorflow/tensorflow#50170; a plain `tf.custom_gradient` reading a variable in a
    branch fails the same way). Each handle is captured instead through the registered
    path, and later captures of the eager handle resolve to it: in a while gradient,
    the placeholder by which the forward body captured it (a loop invariant); in a
    cond gradient, a capture by the graph around it (the fix given in #50170). The
    outermost graph goes first, so that an inner graph's capture through it is routed.
    """
    graphs = []
    graph = tf.compat.v1.get_default_graph()
    while isinstance(graph, func_graph.FuncGraph):
        graphs.append(graph)
        graph = getattr(graph, "outer_graph", None)
    for graph in reversed(graphs):
        if isinstance(graph, while_v2._WhileBodyGradFuncGraph):  # noqa: SLF001
            forward = graph._forward_graph._function_captures  # noqa: SLF001
            routes = [(h, forward.by_val_internal.get(id(h))) for h in handles]
        elif isinstance(graph, cond_v2._CondGradFuncGraph):  # noqa: SLF001
            routes = [(h, graph.outer_graph.capture(h)) for h in handles]
        else:
            continue
        mine = graph._function_captures  # noqa: SLF001
        for handle, placeholder in routes:
            if placeholder is None or id(handle) in mine.by_val_internal:
                continue
            graph.capture(placeholder)
            # The same capture, found by the eager handle's key from now on.
            external, internal, tracetype = mine.pop(id(placeholder))
            mine.add_or_replace(id(handle), external, internal, tracetype)


def _refuse_differentiation(tensors, message):
    """Identity on `tensors` whose own gradient raises `message` (NotImplementedError)."""

    @tf.custom_gradient
    def guard(*xs):
        def grad(*_):
            raise NotImplementedError(message)

        return [tf.identity(x) for x in xs], grad

    return list(guard(*tensors)) if tensors else []


_SECOND_ORDER = (
    "The gradient of a tfaca solve was differentiated again (a second derivative, a "
    "Hessian-vector product or a gradient penalty), which {what}. {instead}"
)


def _solve_with_custom_gradient(forward, backward, func, times, y0, args, *, second_order,
                                written=(), t_shape=()):
    """Runs `forward` with no tape recording and gives its outputs `backward` as gradient.

    `times`: a list of time tensors (`_times(plan)`). `forward(times, y0, args) ->
    Trajectory`. `backward(trajectory, times, y0, sources, g_ys, variables,
    differentiable)` returns the gradients of each of `times`, each `y0`, each source
    and each variable, as one flat list in that order, where `sources` are the floating
    `args` followed by the watched tensors `func` closes over, and
    `differentiable` says that a tape records the backward pass. `second_order`: a
    message for when the strategy's gradient cannot be differentiated, or None when the
    differentiable backward is exact. `written`: variables the backward pass assigns
    (the adjoint's counters). `tf.custom_gradient` lives only here.
    """
    graph = tf.compat.v1.get_default_graph()
    if isinstance(graph, func_graph.FuncGraph):
        # Inputs from a graph around this one (a tf.cond branch's input from the loop
        # around it) are captured here, where the backward pass, built in the branch's
        # gradient graph, can reach them; it cannot reach the outer graph's tensors.
        times, y0, args = ([graph.capture(x) for x in xs] for xs in (times, y0, args))
    with tape_record.stop_recording(), tape_record.VariableWatcher() as watcher:
        trajectory = forward(times, y0, args)
    variables = _unique(v for v in watcher.watched_variables() if v.trainable)
    closed_over, handles = _probe(func, times, y0, args, t_shape)
    if not tf.executing_eagerly():
        # Capture them here too, so that a backward pass inside a loop's gradient can
        # reach them through this graph (see `_route_handles_through_forward_graphs`).
        handles += [v.handle for v in written]
        for v in written:
            tf.identity(v.handle)
            # Recorded as used by the function being traced, as a read would be: a
            # SavedModel export (Keras' `model.export`) saves the variables its functions
            # use, and refuses a captured handle of any other ("untracked resource").
            resource_variable_ops.variable_accessed(v)
    sources = [a for a in args if a.dtype.is_floating] + closed_over

    num_times = len(times)

    @tf.custom_gradient
    def attach(*inputs):
        times = list(inputs[:num_times])

        def grad(*g_ys):
            g_ys = [_zeros_if_none(g, y) for g, y in zip(g_ys, trajectory.ys)]
            recording = tape_record.could_possibly_record()
            _route_handles_through_forward_graphs(handles)
            grads = backward(
                trajectory, times, y0, sources, g_ys, variables,
                recording and second_order is None,
            )
            if second_order is not None:
                grads = _refuse_differentiation(grads, second_order)
            elif not recording and not tf.executing_eagerly():
                # Only `tf.gradients` can differentiate what no tape recorded.
                grads = _refuse_differentiation(grads, _SECOND_ORDER.format(
                    what="only a GradientTape active while the first gradient is taken "
                    "can follow", instead="Take both derivatives with nested "
                    "tf.GradientTape()s."))
            return grads

        return list(trajectory.ys), grad

    # Variables enter as their values read here: the gradient of a read reaches the
    # variable, and no resource handle crosses the custom gradient (handles inside a
    # tf.while_loop cannot, TensorFlow's "internal_captures" error).
    reads = [tf.convert_to_tensor(v) for v in variables]
    ys = attach(*times, *y0, *sources, *reads)
    return trajectory._replace(ys=list(ys))


class ACAGradient(AbstractGradient):
    """The adaptive checkpoint adjoint: exact gradients of the accepted steps (default).

    Gradients reach `y0`, `args`, every entry of `ts`, the variables that `func` reads
    (Keras weights included) and tensors it closes over. The backward pass evaluates
    `func` once per stage that the solution uses (6 for Dopri5 and Tsit5, whose seventh,
    FSAL, stage only serves the next step) per accepted step, and with interpolated
    outputs one more at the end of the solve (`Stats.num_fevals_backward`).

    Checkpoints are kept only when a gradient may be asked for: a solve traced or run
    with no `tf.GradientTape` active (Keras' `predict` and `evaluate`, a served
    SavedModel, eager inference) writes none. A `tf.function` traced with no tape active
    and later differentiated by a tape around its call solves forward again in its
    backward pass to record them (one more forward solve, not counted in
    `num_fevals_backward`).

    The replay checks that it rebuilds the states the forward pass accepted (to
    `sqrt(eps)` relative): if `func` is not a deterministic function of `(t, y)` (it draws
    random numbers, or reads a variable that changed between the forward and the
    backward pass) the gradient raises (`InvalidArgumentError` in a graph) instead of
    silently belonging to another computation; under XLA, or with `throw=False`, the
    gradients are NaN instead. `ODELayer` makes Keras' random layers (Dropout, noise)
    draw once per call, so they pass; in `solve`, draw the randomness outside `func` and
    pass it in `args`.
    """

    name = "aca"

    def __init__(self, checkpoints=None):
        if checkpoints is not None and (
                not isinstance(checkpoints, numbers.Integral) or isinstance(checkpoints, bool)
                or checkpoints < 1):
            raise ValueError(
                "`checkpoints` must be None (keep every accepted step) or a positive int, "
                f"the number of states to keep. Received: checkpoints={checkpoints!r}")
        self.checkpoints = None if checkpoints is None else int(checkpoints)

    def options(self):
        return {"checkpoints": self.checkpoints}

    def solve(self, solver, controller, func, plan, y0, args, *, throw=True, jit=False,
              **loop_kwargs):
        _check_replayable(self, solver, plan, loop_kwargs, budget=self.checkpoints is not None)
        budget = self.checkpoints
        options = _options(controller, loop_kwargs)

        def forward_with(record):
            forward = _forward(solver, func, jit, record=record, states=budget)
            return lambda times, y0, args: forward(times, y0, args, options)

        # Checkpoints only when a tape may ask for the gradient (see the class docstring);
        # a plain graph, or a compiled loop that returns them, cannot drop them later.
        record = tape_record.could_possibly_record()
        per_sample = loop_kwargs.get("per_sample", False)

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable):
            if not record:
                with tape_record.stop_recording():
                    trajectory = forward_with(True)(times, y0, args)
            if differentiable:
                f = lambda t, y: func(t, y, args)  # noqa: E731
                return _unrolled_vjp(solver, f, trajectory, times, y0, sources, g_ys, variables)
            # The `sources` that `func` closes over reach the compiled function as
            # captures, as `func` reads them, so that the tape inside watches what
            # `func` uses; the `args` as arguments.
            replay_fn = (_replay_per_sample if per_sample else
                         _replay if budget is None else _replay_budget)
            replay = compiled(lambda checkpoints, times, g_ys, args: replay_fn(
                solver, lambda t, y: func(t, y, args), checkpoints, times,
                _sources_with(sources, args), g_ys, variables), jit, ("replay",))
            mismatch, grads = replay(trajectory.checkpoints, times, g_ys, args)
            return _check_replay(mismatch, grads, throw)

        second_order = None
        if per_sample:
            second_order = _SECOND_ORDER.format(
                what="ACA with per-sample steps does not support yet",
                instead='Use per_sample=False, or gradient="naive".')
        trajectory = _solve_with_custom_gradient(
            forward_with(record), backward, func, _times(plan), y0, args,
            second_order=second_order, t_shape=y0[0].shape[:1] if per_sample else (),
        )
        stats = trajectory.stats
        if plan.dense:
            # The stages of each step's interpolant but its last, f(t1, y1), which is
            # the next step's first stage, plus that stage once at the end of the solve.
            replay_fevals = stats.num_steps * (len(solver.dense_weights) - 1) + 1
        else:
            # With a budget, each step is rebuilt forward once before its replay.
            replay_fevals = (stats.num_steps * solver.tableau.solution_stages
                             * (1 if budget is None else 2))
        return trajectory._replace(stats=stats._replace(num_fevals_backward=replay_fevals))


def _check_replayable(strategy, solver, plan, loop_kwargs, budget):
    """Refuses the combinations a replaying strategy does not support, naming them."""
    alf = isinstance(solver, ALF)
    if isinstance(strategy, MALIGradient) and not alf:
        raise ValueError(
            'gradient="mali" needs method="alf": it rebuilds each step from the next by '
            "inverting the asynchronous leapfrog step, which only ALF has. Received: "
            f"method={solver!r}")
    if isinstance(strategy, ACAGradient) and alf:
        raise ValueError(
            'method="alf" carries an approximation of dy/dt as state, which ACA\'s replay '
            'does not keep: use gradient="mali" (exact for the ALF steps, no states kept), '
            '"naive" or "adjoint". Received: gradient="aca"')
    if budget:
        what = "a checkpoint budget"
    elif isinstance(strategy, MALIGradient):
        what = "MALI"
    else:
        return
    if plan.dense:
        raise ValueError(
            f"With {what}, the solve must step onto every output time: interpolating "
            "outputs would keep every step's polynomial, the memory it saves. Pass "
            f"interpolate=False (or two times, start and end). Received: {plan.ts.shape[-1] + 1} "
            "output times with interpolate=True")
    if loop_kwargs.get("per_sample"):
        raise ValueError(f"{what.capitalize()} does not support per_sample=True yet. Received: "
                         "per_sample=True")


class MALIGradient(AbstractGradient):
    """MALI: exact gradients of the ALF steps with memory constant in the number of steps.

    Zhuang, Dvornek, Tatikonda & Duncan, "MALI: A memory efficient and reverse accurate
    integrator for Neural ODEs", ICLR 2021. Only with `method="alf"`, whose step is
    invertible: the forward pass keeps the end state `(y_N, v_N)` and each accepted
    step's `(t_i, dt_i)` (scalars); the backward pass, for `i = N - 1 ... 0`, rebuilds
    the step's input `(y_i, v_i)` from its output with `ALF.inverse` (one evaluation of
    `func`) and pulls the cotangents `(a_y, a_v)` back through the step, reusing that
    evaluation's vector-Jacobian product: the step is `k = y + v h/2, u = func(t + h/2, k),
    v' = v + 2 damping (u - v), y' = k + v' h/2`, and `func` at `k` is all it evaluates.
    Last, `a_v` is pulled through `v_0 = func(t_0, y_0)`. Backward cost: one evaluation
    of `func` and its vector-Jacobian product per step, plus one.

    The gradient is that of the accepted ALF steps with their sizes fixed, as ACA's is of
    the Runge–Kutta steps; it differs from backprop through those steps only by the
    rounding of the rebuilt states (`benchmarks/mali_memory.md` measures it). Outputs
    must be stepped onto (`interpolate=False`, or two times); not with `per_sample`.
    The gradient cannot be differentiated again (second derivatives raise).
    """

    name = "mali"

    def solve(self, solver, controller, func, plan, y0, args, *, throw=True, jit=False,
              **loop_kwargs):
        _check_replayable(self, solver, plan, loop_kwargs, budget=False)
        options = _options(controller, loop_kwargs)

        def forward_with(record):
            forward = _forward(solver, func, jit, record=record, states=0)
            return lambda times, y0, args: forward(times, y0, args, options)

        record = tape_record.could_possibly_record()

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable):
            del differentiable  # refused: second_order below
            if not record:
                with tape_record.stop_recording():
                    trajectory = forward_with(True)(times, y0, args)
            replay = compiled(lambda checkpoints, times, y0, g_ys, args: _mali_replay(
                solver, lambda t, y: func(t, y, args), checkpoints, times, y0,
                _sources_with(sources, args), g_ys, variables), jit, ("replay",))
            drifted, grads = replay(trajectory.checkpoints, times, y0, g_ys, args)
            return _check_replay(drifted, grads, throw, _DRIFTED)

        trajectory = _solve_with_custom_gradient(
            forward_with(record), backward, func, _times(plan), y0, args,
            second_order=_SECOND_ORDER.format(
                what="MALI does not support",
                instead='Use gradient="naive" with method="alf".'),
        )
        stats = trajectory.stats
        return trajectory._replace(stats=stats._replace(num_fevals_backward=stats.num_steps + 1))


def _mali_replay(solver, f, checkpoints, times, y0, sources, g_ys, variables):
    """MALI's backward pass (see `MALIGradient`). Returns `(drifted, grads)`: the number of
    steps if the rebuilt start differs from `y0` by more than `sqrt(eps)` relative, else
    -1 (`_check_replay` reports it), and the gradients of the stops, `y0`, the sources
    and the variables, as one flat list."""
    cp = checkpoints
    stops = times[0]
    lam = solver.damping

    def step_vjp(i, y1, v1, a_y, a_v, g_stops, g_sources, g_vars):
        t, dt, j, hit = cp.t[i], cp.dt[i], cp.interval[i], cp.hit[i]
        # The output stops[j] is y_{i+1} when this step lands on it (`tf.gather`, not
        # `g[j]`: see `_replay`).
        a_y = [a + tf.where(hit, tf.gather(g, j), tf.zeros_like(a)) for a, g in zip(a_y, g_ys)]
        half = 0.5 * dt
        s1 = t + half
        k = solver.midpoint(y1, v1, dt)
        with tf.GradientTape() as tape:
            tape.watch([s1] + k + sources)
            u = f(s1, k)
        y0_, v0 = solver.start(k, u, v1, dt)
        # Cotangents through v' = v + 2 lam (u - v) and y' = k + v' h/2.
        bar_v1 = [av + half * ay for av, ay in zip(a_v, a_y)]
        bar_u = [2.0 * lam * b for b in bar_v1]
        g_s1, g_k, g_s, g_v = tape.gradient(
            u, [s1, k, sources, list(variables)], output_gradients=bar_u,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        bar_k = [ay + tf.convert_to_tensor(gk) for ay, gk in zip(a_y, g_k)]
        new_a_v = [(1.0 - 2.0 * lam) * b + half * bk for b, bk in zip(bar_v1, bar_k)]
        g_dt = 0.5 * (_dot(a_y, v1) + _dot(bar_k, v0) + g_s1)
        g_stops, g_sources, g_vars = _accumulate(
            cp, i, g_s1, g_dt, [tf.convert_to_tensor(x) for x in g_s],
            [tf.convert_to_tensor(x) for x in g_v], g_stops, g_sources, g_vars)
        return i - 1, y0_, v0, bar_k, new_a_v, g_stops, g_sources, g_vars

    n = cp.num_steps
    state = (n - 1, list(cp.y_end), list(cp.f_end), [tf.zeros_like(y) for y in y0],
             [tf.zeros_like(y) for y in y0], tf.zeros_like(stops),
             [tf.zeros_like(x) for x in sources], [tf.zeros_like(v) for v in variables])
    # One step's graph at a time (see `_replay`).
    _, y_start, _, a_y, a_v, g_stops, g_sources, g_vars = tf.while_loop(
        lambda i, *_: i >= 0, step_vjp, state, parallel_iterations=1)
    eps = float(tf.experimental.numpy.finfo(stops.dtype.as_numpy_dtype).eps)
    # Rounding builds up at the scale the states reach, not at y0's: a component that
    # starts at 0 (a log-density, a zero hidden state) is compared at its end's scale.
    drifted = tf.where(_differs(y_start, y0, math.sqrt(eps), also=cp.y_end), n, -1)
    # v_0 = func(t_0, y_0), from the inputs themselves (not the rebuilt state).
    t0 = stops[0]
    with tf.GradientTape() as tape:
        tape.watch([t0] + list(y0) + sources)
        f0 = f(t0, list(y0))
    g_t0, g_y, g_s, g_v = tape.gradient(
        f0, [t0, list(y0), sources, list(variables)], output_gradients=a_v,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    g_stops = g_stops + tf.one_hot(0, tf.shape(stops)[0], dtype=stops.dtype) * g_t0
    g_y0 = [a + tf.convert_to_tensor(g) + g_out[0] for a, g, g_out in zip(a_y, g_y, g_ys)]
    g_sources = [x + tf.convert_to_tensor(y) for x, y in zip(g_sources, g_s)]
    g_vars = [x + tf.convert_to_tensor(y) for x, y in zip(g_vars, g_v)]
    return drifted, [g_stops, *g_y0, *g_sources, *g_vars]


def _step_vjp(solver, f, t, dt, y, a, g_c, g_f0, sources, variables):
    """Rebuilds one accepted step under a tape and pulls cotangents back through it.

    `a`: the cotangent of the step's end state. With dense output, `g_c` is that of
    its interpolation coefficients and `g_f0` that of its first stage `f(t, y)` as the
    previous step's last interpolation stage (`_replay`); else both are None and only
    the stages `y1` needs are evaluated. Returns
    `(y1, g_t, g_dt, g_y, g_sources, g_variables)`.
    """
    with tf.GradientTape() as tape:
        tape.watch([t, dt] + y + sources)
        f0 = f(t, y)
        if g_c is None:
            y1, _, _ = solver.step(f, t, y, f0, dt, solution_only=True)
            targets, cotangents = y1, a
        else:
            y1, k = solver.replay_stages(f, t, y, f0, dt)
            targets = y1 + solver.dense_coefficients(dt, k) + f0
            cotangents = list(a) + list(g_c) + list(g_f0)
    g_t, g_dt, g_y, g_s, g_v = tape.gradient(
        targets, [t, dt, y, sources, list(variables)], output_gradients=cotangents,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    convert = lambda xs: [tf.convert_to_tensor(x) for x in xs]  # noqa: E731
    return y1, g_t, g_dt, convert(g_y), convert(g_s), convert(g_v)


def _last_stage_cotangents(solver, dt, g_c):
    """The cotangent of each step's last interpolation stage `f(t_{i+1}, y_{i+1})`,
    from its coefficients' (`c_p = dt sum_j w[j][p] k_j`): `dt sum_p w[-1][p] g_c[p]`,
    a flat list of `[size, ...]`."""
    out = []
    for g in g_c:
        w = tf.constant(solver.dense_weights[-1], g.dtype)  # [degree]
        combined = tf.tensordot(g, w, [[1], [0]])  # [size, ...]
        # dt: [size], or [size, batch] with per-sample steps.
        scale = tf.reshape(dt, tf.concat([tf.shape(dt), [1] * (combined.shape.rank - dt.shape.rank)], 0))
        out.append(scale * combined)
    return out


def _replay(solver, f, checkpoints, times, sources, g_ys, variables):
    """The ACA backward pass: pull the output cotangents back through the accepted steps.

    Outputs the loop stepped onto add their cotangent to the state the step lands on;
    interpolated outputs are first carried onto the steps they lie in
    (`_outputs.pullback`), and every step is replayed with its interpolant, whose
    coefficients receive their cotangents with the end state's. The interpolant's last
    stage, `f(t_{i+1}, y_{i+1})`, is not rebuilt with step `i`: it is step `i + 1`'s
    first stage, which takes its cotangent too (and, for the last step, one evaluation
    at the end of the solve). So a step costs the stages `y_{i+1}` needs, with or
    without outputs inside, and no branch is taken per step.

    Returns `(mismatch, grads)`: the first step whose replay did not rebuild the state
    the forward pass accepted (-1 if none; `_check_replay` reports it) and the gradients
    of the times, `y0`, the sources and the variables, as one flat list.
    """
    stops = times[0]
    dense = len(times) > 1
    n = checkpoints.num_steps
    # The first output is y0 itself; the others are read from the steps' interpolants.
    sign = tf.sign(stops[-1] - stops[0])
    pulled = (_outputs.pullback(checkpoints, times[1], [g[1:] for g in g_ys], sign)
              if dense else None)
    # What "the same state" means for the check: rounding (XLA may fuse the forward and
    # the replay differently), never a different random draw.
    eps = float(tf.experimental.numpy.finfo(stops.dtype.as_numpy_dtype).eps)
    same_state = math.sqrt(eps)

    def step_vjp(i, a, g_stops, g_sources, g_vars, mismatch):
        y = [y_n[i] for y_n in checkpoints.y]
        if dense:
            g_c = [g[i] for g in pulled.g_c]
            # f(t_i, y_i) is also step i - 1's last interpolation stage.
            g_f0 = [tf.where(i > 0, g[tf.maximum(i - 1, 0)], tf.zeros_like(g[0]))
                    for g in g_last]
            y1, g_t, g_dt, g_y, g_s, g_v = _step_vjp(
                solver, f, checkpoints.t[i], checkpoints.dt[i], y, a, g_c, g_f0, sources,
                variables)
            g_y = [g_n + p[i] for g_n, p in zip(g_y, pulled.g_y)]
            g_stops, g_sources, g_vars = _accumulate(
                checkpoints, i, g_t, g_dt, g_s, g_v, g_stops, g_sources, g_vars)
        else:
            y1, g_y, g_stops, g_sources, g_vars = _landing_step_vjp(
                solver, f, checkpoints, i, y, a, g_stops, g_sources, g_vars, sources, g_ys,
                variables)
        # The state the forward accepted at the end of this step (entry n is the last).
        differs = _differs(y1, [c[i + 1] for c in checkpoints.y], same_state)
        mismatch = tf.where(differs & (mismatch < 0), i, mismatch)
        return i - 1, g_y, g_stops, g_sources, g_vars, mismatch

    g_stops = tf.zeros_like(stops)
    g_sources = [tf.zeros_like(s) for s in sources]
    g_vars = [tf.zeros_like(v) for v in variables]
    if dense:
        g_last = _last_stage_cotangents(solver, checkpoints.dt, pulled.g_c)
        # The last step's last interpolation stage, f at the end of the solve (t_n is
        # the last stop), evaluated once here; the others are the next steps' first.
        last = tf.maximum(n - 1, 0)
        # Entries picked by the step count, or by a recorded value, are read with
        # `tf.gather`, never `x[n]`: XLA takes a slice's index, and every input it is
        # computed from, as a compile-time constant, and would compile the replay again
        # for every step count (`_jit`).
        end = [tf.gather(x, n) for x in [checkpoints.t, *checkpoints.y]]
        g_f_end = [tf.gather(g, last) for g in g_last]
        with tf.GradientTape() as tape:
            tape.watch(end + sources)
            f_end = f(end[0], end[1:])
        g_end = tape.gradient(
            f_end, [end, sources, list(variables)],
            output_gradients=[tf.where(n > 0, g, tf.zeros_like(g)) for g in g_f_end],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        (g_t_end, *g_y_end), g_s, g_v = [[tf.convert_to_tensor(x) for x in xs] for xs in g_end]
        # That stage's term in the last step's coefficients, dt * w[-1] * f_end, also
        # depends on the landing step's size dt = t_end - t_{n-1} (the replay leaves the
        # term out): <g, f_end> / dt onto t_end, minus onto t0. Stops: [t0, t_end].
        on_dt = _dot(g_f_end, f_end) / tf.gather(checkpoints.dt, last)
        on_dt = tf.where((n > 0) & tf.gather(checkpoints.hit, last), on_dt, tf.zeros_like(on_dt))
        g_stops += tf.stack([-on_dt, on_dt + g_t_end])
        g_sources = [x + y_ for x, y_ in zip(g_sources, g_s)]
        g_vars = [x + y_ for x, y_ in zip(g_vars, g_v)]
        # The outputs at the end of the solve.
        a = [tf.gather(g, n) + g_n for g, g_n in zip(pulled.g_y, g_y_end)]
    else:
        a = [tf.zeros_like(g[0]) for g in g_ys]
    state = (n - 1, a, g_stops, g_sources, g_vars, tf.constant(-1, tf.int32))
    # parallel_iterations=1: each step's replay does not depend on the cotangent, so
    # TensorFlow would otherwise run up to 10 replays ahead and hold their graphs at
    # once; one at a time keeps ACA's memory at one step's graph (XLA ignores it).
    _, a, g_stops, g_sources, g_vars, mismatch = tf.while_loop(
        lambda i, *_: i >= 0, step_vjp, state, parallel_iterations=1
    )
    if dense:
        # The outputs' own pull on each step's t_i and dt_i, added outside the loop (the
        # same mapping as in step_vjp, with j = 1): when no time gradient is wanted, the
        # graph then drops the polynomial derivatives that only it needs.
        # Entry n's time is the end of the solve, the last stop (see `_end_time_gradient`).
        landing = tf.cast(checkpoints.hit, stops.dtype) * pulled.g_dt
        on_end = _end_time_gradient(pulled.g_t, n)
        g_stops += tf.stack([tf.reduce_sum(pulled.g_t) - on_end - tf.reduce_sum(landing),
                             tf.reduce_sum(landing) + on_end])
    g_times = [g_stops, pulled.g_ts] if dense else [g_stops]
    g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
    return mismatch, [*g_times, *g_y0, *g_sources, *g_vars]


def _end_time_gradient(g_t, n):
    """The gradient on entry `n`'s time (`g_t`: `[size]`, or `[size, batch]`), the end of
    the solve: the outputs there take their time's derivative from the end's line
    (`Checkpoints.c`), `-<g, f_end>` onto the end and `+<g, f_end>` onto their own time,
    so that rows of times per sample that end together each get their own."""
    return tf.gather(g_t, n)


def _accumulate(checkpoints, i, g_t, g_dt, g_s, g_v, g_stops, g_sources, g_vars):
    """Adds one replayed step's gradients to the running sums: its start time's and size's
    onto the stops (`t_i = stops[j-1] + offset`; the landing step's `dt = stops[j] - t_i`),
    the sources' and the variables'."""
    j = checkpoints.interval[i]
    g_dt = tf.where(checkpoints.hit[i], g_dt, tf.zeros_like(g_dt))
    g_stops = tf.tensor_scatter_nd_add(g_stops, [[j - 1], [j]], tf.stack([g_t - g_dt, g_dt]))
    return (g_stops, [x + y for x, y in zip(g_sources, g_s)],
            [x + y for x, y in zip(g_vars, g_v)])


def _landing_step_vjp(solver, f, checkpoints, i, y, a, g_stops, g_sources, g_vars, sources,
                      g_ys, variables):
    """Step `i` of ACA's replay when outputs are stepped onto: adds the cotangent of the
    output it lands on (if any) to `a`, pulls `a` back through the step rebuilt from its
    start `y` and accumulates the gradients. Returns `(y1, a, g_stops, g_sources,
    g_vars)`, `y1` the rebuilt end of the step."""
    j = checkpoints.interval[i]
    # The output stops[j] is y_{i+1} when this step lands on it (`tf.gather`: see `_replay`).
    a = [a_n + tf.where(checkpoints.hit[i], tf.gather(g, j), tf.zeros_like(a_n))
         for a_n, g in zip(a, g_ys)]
    y1, g_t, g_dt, g_y, g_s, g_v = _step_vjp(
        solver, f, checkpoints.t[i], checkpoints.dt[i], y, a, None, None, sources, variables)
    return (y1, g_y, *_accumulate(checkpoints, i, g_t, g_dt, g_s, g_v, g_stops, g_sources,
                                  g_vars))


def _replay_budget(solver, f, checkpoints, times, sources, g_ys, variables):
    """ACA's backward pass from a checkpoint budget (`ACAGradient(checkpoints=K)`).

    The forward kept the start of every `stride`-th accepted step (`cp.y[m]` is step
    `m * stride`'s) and every step's `(t_i, dt_i)`. For each segment of `stride` steps,
    last first: rebuild its start states forward from its checkpoint with the recorded
    step sizes (one forward step each, with the stages `y_{i+1}` needs), then replay it
    in reverse as `_replay` does. Same gradient as the full replay to rounding; memory
    `K` checkpoints plus one segment's states. The rebuilt end of each segment is
    checked against the state the forward accepted there. Returns `(mismatch, grads)`
    as `_replay`.
    """
    cp = checkpoints
    stops = times[0]
    n, stride = cp.num_steps, cp.stride
    eps = float(tf.experimental.numpy.finfo(stops.dtype.as_numpy_dtype).eps)
    same_state = math.sqrt(eps)
    # Under XLA the slots past the last segment are there too, unwritten.
    num_segments = (n + stride - 1) // stride
    num_slots = tf.shape(cp.y[0])[0]
    if in_xla_context():
        # Static buffers: a segment is at most `stride < 2 max_steps / K` steps, and
        # never more than `max_steps`.
        max_steps = cp.t.shape[0] - 1
        longest = min(max_steps, -(-2 * max_steps // cp.y[0].shape[0]))
        segment_array = lambda y: tf.TensorArray(  # noqa: E731
            y.dtype, size=longest, element_shape=y.shape)
    else:
        segment_array = lambda y: tf.TensorArray(  # noqa: E731
            y.dtype, size=0, dynamic_size=True, element_shape=y.shape)

    def segment(m, a, g_stops, g_sources, g_vars, mismatch):
        first = m * stride
        last = tf.minimum(first + stride, n)

        def rebuild(i, y, tas):
            tas = [ta.write(i - first, y_n) for ta, y_n in zip(tas, y)]
            t, dt = cp.t[i], cp.dt[i]
            y1, _, _ = solver.step(f, t, y, f(t, y), dt, solution_only=True)
            return i + 1, y1, tas

        start = [y_n[m] for y_n in cp.y]
        _, y_last, tas = tf.while_loop(
            lambda i, *_: i < last, rebuild, (first, start, [segment_array(y) for y in start]),
            parallel_iterations=1)
        recorded = [tf.where(m + 1 < num_segments, y_n[tf.minimum(m + 1, num_slots - 1)], e)
                    for y_n, e in zip(cp.y, cp.y_end)]
        differs = _differs(y_last, recorded, same_state)
        mismatch = tf.where(differs & (mismatch < 0), last - 1, mismatch)

        def replay(i, a, g_stops, g_sources, g_vars):
            y = [ta.read(i - first) for ta in tas]
            _, a, g_stops, g_sources, g_vars = _landing_step_vjp(
                solver, f, cp, i, y, a, g_stops, g_sources, g_vars, sources, g_ys, variables)
            return i - 1, a, g_stops, g_sources, g_vars

        _, a, g_stops, g_sources, g_vars = tf.while_loop(
            lambda i, *_: i >= first, replay, (last - 1, a, g_stops, g_sources, g_vars),
            parallel_iterations=1)
        return m - 1, a, g_stops, g_sources, g_vars, mismatch

    state = (num_segments - 1, [tf.zeros_like(y) for y in cp.y_end], tf.zeros_like(stops),
             [tf.zeros_like(x) for x in sources], [tf.zeros_like(v) for v in variables],
             tf.constant(-1, tf.int32))
    _, a, g_stops, g_sources, g_vars, mismatch = tf.while_loop(
        lambda m, *_: m >= 0, segment, state, parallel_iterations=1)
    g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
    return mismatch, [g_stops, *g_y0, *g_sources, *g_vars]


def _replay_per_sample(solver, f, checkpoints, times, sources, g_ys, variables):
    """ACA's backward pass for per-sample steps (`integrate(per_sample=True)`).

    Entry `i` of the checkpoints is one iteration of the forward loop: every sample's
    trial from its own `(t_i, dt_i, y_i)`, of which the samples in `accepted[i]` were
    kept. It is replayed once for the whole batch under a tape, with the cotangent of the
    samples that did not step there set to zero (they pass nothing to the parameters, the
    times or the state) and their cotangent carried over unchanged. Each sample thus gets
    the exact gradient of its own accepted steps, as if solved alone, and the
    parameters the sum over the samples. As in `_replay`, an interpolant's last stage
    `f(t_{i+1}, y_{i+1})` is the first stage of the sample's next accepted step, which
    takes its cotangent: found per sample through `checkpoints.previous`.

    Same returns as `_replay`.
    """
    cp = checkpoints
    stops = times[0]
    dense = len(times) > 1
    n = cp.num_steps
    batch = tf.shape(cp.t)[1]
    num_stops = tf.shape(stops)[-1]
    stops_b = tf.broadcast_to(stops, tf.stack([batch, num_stops]))
    rows = tf.range(batch)
    sign = tf.sign(tf.reduce_sum(stops_b[:, -1] - stops_b[:, 0]))
    eps = float(tf.experimental.numpy.finfo(stops.dtype.as_numpy_dtype).eps)
    same_state = math.sqrt(eps)

    def masked(mask, xs, axis=0):
        return [tf.where(per_row(mask, x, axis), x, tf.zeros_like(x)) for x in xs]

    def per_sample_entry(xs, entry):
        """`x[entry[b], b]` for each `[size, batch, ...]` x; zero where `entry` is -1."""
        where = tf.stack([tf.maximum(entry, 0), rows], axis=1)
        return masked(entry >= 0, [tf.gather_nd(x, where) for x in xs])

    if dense:
        later = times[1]
        later_b = tf.broadcast_to(later, tf.stack([batch, tf.shape(later)[-1]]))
        pulled = _outputs.pullback(cp, later_b, [g[1:] for g in g_ys], sign)
        g_last = _last_stage_cotangents(solver, cp.dt, pulled.g_c)

    def step_vjp(i, a, g_stops, g_sources, g_vars, mismatch):
        t, dt, y = cp.t[i], cp.dt[i], [y_n[i] for y_n in cp.y]
        accepted = cp.accepted[i]
        hit = cp.hit[i] & accepted
        j = tf.clip_by_value(cp.interval[i], 1, num_stops - 1)
        if not dense:
            # The output stops[b, j] is sample b's y_{i+1} when its step lands on it.
            landed = masked(hit, [tf.gather_nd(g, tf.stack([j, rows], 1)) for g in g_ys])
            a = [a_n + g_n for a_n, g_n in zip(a, landed)]
        with tf.GradientTape() as tape:
            tape.watch([t, dt] + y + sources)
            f0 = f(t, y)
            if dense:
                y1, k = solver.replay_stages(f, t, y, f0, dt)
                targets = y1 + solver.dense_coefficients(dt, k) + f0
                # f(t_i, y_i) is also the last interpolation stage of the sample's
                # previous accepted step.
                cotangents = (masked(accepted, a)
                              + masked(accepted, [g[i] for g in pulled.g_c], axis=1)
                              + masked(accepted, per_sample_entry(g_last, cp.previous[i])))
            else:
                y1, _, _ = solver.step(f, t, y, f0, dt, solution_only=True)
                targets, cotangents = y1, masked(accepted, a)
        g_t, g_dt, g_y, g_s, g_v = tape.gradient(
            targets, [t, dt, y, sources, list(variables)], output_gradients=cotangents,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        g_y = [tf.convert_to_tensor(x) for x in g_y]
        if dense:
            g_y = [g_n + p for g_n, p in zip(g_y, masked(accepted, [p[i] for p in pulled.g_y]))]
        a = [tf.where(per_row(accepted, a_n), g_n, a_n) for a_n, g_n in zip(a, g_y)]
        # t_i = stops[b, j-1] + offset; the landing step's dt = stops[b, j] - t_i.
        g_dt = tf.where(hit, g_dt, tf.zeros_like(g_dt))
        g_stops = tf.tensor_scatter_nd_add(
            g_stops, tf.concat([tf.stack([rows, j - 1], 1), tf.stack([rows, j], 1)], 0),
            tf.concat([g_t - g_dt, g_dt], 0))
        g_sources = [x + tf.convert_to_tensor(y_) for x, y_ in zip(g_sources, g_s)]
        g_vars = [x + tf.convert_to_tensor(y_) for x, y_ in zip(g_vars, g_v)]
        # Entry i + 1 holds every sample's state after iteration i.
        recorded = [c[i + 1] for c in cp.y]
        rebuilt = [tf.where(per_row(accepted, y_n), y_n, r) for y_n, r in zip(y1, recorded)]
        differs = _differs(rebuilt, recorded, same_state)
        mismatch = tf.where(differs & (mismatch < 0), i, mismatch)
        return i - 1, a, g_stops, g_sources, g_vars, mismatch

    g_stops = tf.zeros_like(stops_b)
    g_sources = [tf.zeros_like(x) for x in sources]
    g_vars = [tf.zeros_like(v) for v in variables]
    if dense:
        # Each sample's last interpolation stage, f at the end of its solve, evaluated
        # once here (the stops are [t0, t_end] per sample).
        last = tf.gather(cp.previous, n)
        g_f_end = per_sample_entry(g_last, last)
        end = [tf.gather(x, n) for x in [cp.t, *cp.y]]
        with tf.GradientTape() as tape:
            tape.watch(end + sources)
            f_end = f(end[0], end[1:])
        g_end = tape.gradient(
            f_end, [end, sources, list(variables)], output_gradients=g_f_end,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        (g_t_end, *g_y_end), g_s, g_v = [[tf.convert_to_tensor(x) for x in xs] for xs in g_end]
        # That stage's term in the last step's coefficients depends on the landing step's
        # size dt = t_end - t_{last}: <g, f_end> / dt onto t_end, minus onto t0.
        dt_last, hit_last = per_sample_entry([cp.dt, cp.hit], last)
        inner = tf.add_n([tf.reduce_sum(g * x, axis=list(range(1, x.shape.rank)))
                          if x.shape.rank > 1 else g * x for g, x in zip(g_f_end, f_end)])
        on_dt = tf.where(hit_last, inner / tf.where(hit_last, dt_last, 1), tf.zeros_like(inner))
        g_stops += tf.stack([-on_dt, on_dt + g_t_end], axis=1)
        g_sources = [x + y_ for x, y_ in zip(g_sources, g_s)]
        g_vars = [x + y_ for x, y_ in zip(g_vars, g_v)]
        a = [tf.gather(g, n) + g_n for g, g_n in zip(pulled.g_y, g_y_end)]  # each sample's end
        landing = tf.where(cp.hit & cp.accepted, pulled.g_dt, tf.zeros_like(pulled.g_dt))
        on_end = _end_time_gradient(pulled.g_t, n)
        g_stops += tf.stack([tf.reduce_sum(pulled.g_t - landing, axis=0) - on_end,
                             tf.reduce_sum(landing, axis=0) + on_end], axis=1)
    else:
        a = [tf.zeros_like(g[0]) for g in g_ys]
    state = (n - 1, a, g_stops, g_sources, g_vars, tf.constant(-1, tf.int32))
    _, a, g_stops, g_sources, g_vars, mismatch = tf.while_loop(
        lambda i, *_: i >= 0, step_vjp, state, parallel_iterations=1
    )
    if stops.shape.rank == 1:
        g_stops = tf.reduce_sum(g_stops, axis=0)
    g_times = [g_stops]
    if dense:
        g_times.append(pulled.g_ts if times[1].shape.rank == 2
                       else tf.reduce_sum(pulled.g_ts, axis=0))
    g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
    return mismatch, [*g_times, *g_y0, *g_sources, *g_vars]


def _differs(ys, recorded, relative, also=None):
    """Whether any component of `ys` differs from `recorded` by more than `relative` times
    the component's largest magnitude (in `ys`, `recorded`, and `also` if given)."""
    out = tf.constant(False)
    for n, (y, r) in enumerate(zip(ys, recorded)):
        scale = tf.maximum(tf.reduce_max(tf.abs(r)), tf.reduce_max(tf.abs(y)))
        if also is not None:
            scale = tf.maximum(scale, tf.reduce_max(tf.abs(also[n])))
        out |= tf.reduce_max(tf.abs(y - r)) > relative * scale
    return out


_NOT_REPRODUCED = (
    "ACA's backward pass did not reproduce the forward solve: replaying accepted step "
    "{step} gave another state than the forward pass accepted. `func` must be a "
    "deterministic function of (t, y): it draws random numbers (Dropout, noise layers, "
    "tf.random) or reads state that changed after the forward pass. tfaca.ODELayer "
    "draws Keras random layers once per call; with tfaca.solve, draw the randomness "
    "outside `func` and pass it in `args`, or use gradient=\"naive\"."
)


_DRIFTED = (
    "MALI's backward pass did not rebuild the start of the solve: inverting the {steps} "
    "accepted ALF steps from the end gave a y0 off by more than sqrt(eps) relative, so "
    "the gradient would be taken along other states. The inverse step magnifies rounding "
    "by |1 / (1 - 2 damping)| per step when damping != 1 (use damping=1), float32 "
    "rounding builds up over very many steps (use float64, or fewer steps), or `func` is "
    "not a deterministic function of (t, y). gradient=\"naive\" with method=\"alf\", or a "
    "Runge–Kutta method with ACA, keep the states instead of rebuilding them."
)


def _check_replay(mismatch, grads, throw, message=_NOT_REPRODUCED):
    """Raise (eagerly or by a graph assertion) if the replay diverged; under XLA or with
    `throw=False`, make the gradients NaN instead: never a silently wrong gradient.
    `message` has a `{step}` field for the step `mismatch` names."""
    bad = mismatch >= 0
    if throw and hasattr(mismatch, "numpy"):
        if bool(bad):
            raise tf.errors.InvalidArgumentError(
                None, None, message.format(step=int(mismatch), steps=int(mismatch))
            )
        return grads
    if throw and not in_xla_context():
        check = graph_assert(
            tf.logical_not(bad), [message.format(step="i", steps="i"), "i =", mismatch]
        )
        with tf.control_dependencies([check]):
            return [tf.identity(g) for g in grads]
    return _nan_where(bad, grads)


def _nan_where(failed, grads):
    """`grads`, all NaN where `failed` (a scalar bool): a gradient that could not be
    computed reads as one."""
    return [tf.where(failed, tf.constant(float("nan"), g.dtype), g) for g in grads]


def _unrolled_vjp(solver, f, trajectory, times, y0, sources, g_ys, variables):
    """ACA's gradient as backprop through the accepted steps rebuilt from `y0`.

    Used when a tape records the backward pass: every rebuilt state (and interpolant) is
    then a function of `y0`, the times, the sources and the variables, so the gradient
    returned is itself exactly differentiable (the replay's checkpoints would be
    constants). Same value as `_replay` to rounding; memory: every accepted step's graph.
    """
    cp = trajectory.checkpoints
    stops = times[0]
    dense = len(times) > 1

    def start(i):
        # The step's start as a function of the stops (its offset in the interval is
        # fixed); the landing step's size follows stops[j].
        j = cp.interval[i]
        t = stops[j - 1] + tf.stop_gradient(cp.t[i] - stops[j - 1])
        return t, tf.where(cp.hit[i], stops[j] - t, cp.dt[i])

    def step(i, y, total, ys_ta, cs_ta):
        t, dt = start(i)
        if not dense:
            y1, _, _ = solver.step(f, t, y, f(t, y), dt, solution_only=True)
            j = cp.interval[i]
            landed = _dot([g[j] for g in g_ys], y1)
            return i + 1, y1, total + tf.where(cp.hit[i], landed, tf.zeros_like(landed)), (), ()
        y1, _, _, k = solver.step(f, t, y, f(t, y), dt, return_stages=True)
        stages = k + [f(t + dt, y1)] if solver.dense_needs_f1 else k
        c = solver.dense_coefficients(dt, stages)
        ys_ta = [ta.write(i, y_n) for ta, y_n in zip(ys_ta, y)]
        cs_ta = [ta.write(i, c_n) for ta, c_n in zip(cs_ta, c)]
        return i + 1, y1, total, ys_ta, cs_ta

    size = tf.shape(cp.t)[0]
    with tf.GradientTape() as tape:
        tape.watch([*times, *y0, *sources])
        # sum_j <g_ys[j], ys[j]>, with ys rebuilt: its gradient is the VJP.
        total = _dot([g[0] for g in g_ys], y0)
        if dense:
            ys_ta = [tf.TensorArray(y.dtype, size=size, element_shape=y.shape) for y in y0]
            cs_ta = [tf.TensorArray(c.dtype, size=size, element_shape=c.shape[1:]) for c in cp.c]
        else:
            ys_ta, cs_ta = (), ()
        # XLA differentiates a loop only with a static bound: the buffers' size.
        _, y_end, total, ys_ta, cs_ta = tf.while_loop(
            lambda i, *_: i < cp.num_steps, step,
            (tf.constant(0, tf.int32), list(y0), total, ys_ta, cs_ta),
            maximum_iterations=cp.t.shape[0],
        )
        if dense:
            n = cp.num_steps
            last = tf.range(size) == n
            t = tf.where(last, stops[1], stops[0] + tf.stop_gradient(cp.t - stops[0]))
            rebuilt = Checkpoints(
                t=t,
                dt=tf.where(cp.hit, stops[1] - t, cp.dt),
                interval=(),
                hit=(),
                y=[ta.write(n, y).stack() for ta, y in zip(ys_ta, y_end)],
                c=[ta.write(n, tf.concat([f_n[None], tf.zeros_like(c[0][1:])], 0)).stack()
                   for ta, c, f_n in zip(cs_ta, cp.c, f(t[n], y_end))],
                num_steps=n,
            )
            later = _outputs.evaluate(rebuilt, times[1], t[n], tf.sign(stops[1] - stops[0]))
            total += _dot([g[1:] for g in g_ys], later)
    grads = tape.gradient(
        total, [*times, *y0, *sources, *variables],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return [tf.convert_to_tensor(g) for g in grads]


class AdjointGradient(AbstractGradient):
    """The continuous adjoint of Chen, Rubanova, Bettencourt & Duvenaud (NeurIPS 2018).

    Keeps only the outputs; the backward pass solves the augmented system
    `[y, a, g_args, g_vars]` backwards from each output time to the previous one (with
    times per sample, through every sample's times in time order, one solve for the
    batch, resetting only that sample's state at its time),
    `dy/dt = f`, `da/dt = -a^T df/dy`, `dg/dt = -a^T df/d(args, variables)`, with the
    same solver. At each output time `y` is reset to the forward value and `a` receives
    that output's cotangent (as torchdiffeq does). Time gradients need no extra
    integral: `dL/dts[j] = <dL/dys[j], f(ts[j], ys[j])>` for `j >= 1` and
    `dL/dts[0] = -<a(ts[0]), f(ts[0], y0)>`.

    Memory O(state) in the number of steps, but the reverse solve of `y` drifts from
    the forward trajectory (Zhuang et al. 2020, Fig. 4), so the gradient is only as
    accurate as that reverse solve: the point of comparison for ACA. Its gradient cannot
    be differentiated again (second derivatives raise; use `"aca"` or `"naive"`), and a
    `func` that draws random numbers gives a wrong gradient that nothing can detect
    (`ODELayer` draws Keras random layers once per call, which makes them safe).

    Args:
        rtol, atol: tolerances of the reverse solve (scalars); default: those of the
            forward solve (for parameter components, the smallest forward tolerance).
        max_steps: trial-step bound per output interval of the reverse solve; default:
            the forward's.

    Attributes:
        backward_stats: a `Stats` of int32 `tf.Variable`s holding the counts of the
            last reverse solve made with this instance (summed over output intervals;
            all 0 before the first gradient), readable after a gradient computed
            eagerly, in a `tf.function` or under XLA (`int(s.num_fevals)`);
            `ODELayer.gradient_strategy` is the layer's instance. Under a
            `tf.distribute` strategy they count the first replica's solve. An instance
            created inside a `tf.function` or `strategy.run` (as the name "adjoint"
            passed to `solve` there makes one) cannot hold variables: `None`.
    """

    name = "adjoint"

    def __init__(self, rtol=None, atol=None, max_steps=None):
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.backward_stats = None
        # Variables cannot be created in a function being traced (a name passed to
        # `solve` there builds a fresh instance whose counters nobody could read) nor
        # inside `strategy.run`.
        in_replica_fn = tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
        if not (tf.inside_function() or in_replica_fn):
            with tf.init_scope():
                self.backward_stats = Stats(*(
                    tf.Variable(
                        0, dtype=tf.int32, trainable=False, name=f"adjoint_{field}",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    )
                    for field in Stats._fields
                ))

    def options(self):
        return {"rtol": self.rtol, "atol": self.atol, "max_steps": self.max_steps}

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"

    def solve(self, solver, controller, func, plan, y0, args, *, throw=True, jit=False,
              **loop_kwargs):
        options = _options(controller, loop_kwargs)
        # The reverse solve needs the outputs and the end state, not the steps.
        run = _forward(solver, func, jit, record=False, checkpoints=False)

        def forward(times, y0, args):
            return run(times, y0, args, options)

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable):
            # As in ACA's replay; the counters are an argument too: a compiled function
            # reused by another instance's solve counts into that instance's.
            method = self._reverse_solve_per_sample if per_sample else self._reverse_solve

            def reverse_solve(trajectory, times, y0, g_ys, args, options, counters):
                controller, loop_kwargs = _unpack(options)
                return method(solver, controller, func, trajectory, times, y0, args,
                              _sources_with(sources, args), g_ys, variables, loop_kwargs,
                              counters)

            reverse = compiled(reverse_solve, jit, ("reverse",))
            grads, status, t_final = reverse(trajectory, times, y0, g_ys, args, options,
                                             self.backward_stats)
            if throw:
                return raise_on_failure(status, t_final, grads, "in the adjoint's reverse solve")
            return _nan_where(tf.reduce_any(status != 0), grads)

        per_sample = loop_kwargs.get("per_sample", False)
        refusal = _SECOND_ORDER.format(
            what="the adjoint cannot give: its reverse solve takes the forward outputs "
            "as constants", instead='Use gradient="aca" (exact) or "naive".')
        trajectory = _solve_with_custom_gradient(
            forward, backward, func, _times(plan), y0, args, second_order=refusal,
            written=self.backward_stats or (), t_shape=y0[0].shape[:1] if per_sample else (),
        )
        unknown = tf.constant(-1, tf.int32) - tf.zeros_like(trajectory.stats.num_steps)
        return trajectory._replace(stats=trajectory.stats._replace(num_fevals_backward=unknown))

    def _reverse_solve(self, solver, controller, func, trajectory, times, y0, args, sources,
                       g_ys, variables, loop_kwargs, counters):
        """The gradients (a flat list), the reverse solve's status and where it ended;
        `counters`: `backward_stats` (or None), which it assigns."""
        params = list(sources) + [tf.convert_to_tensor(v) for v in variables]
        num_y, num_p = len(y0), len(params)
        ys = trajectory.ys
        stops = times[0]
        # The output times after the start: ys[1:] are the states there.
        later = times[1] if len(times) > 1 else stops[1:]
        per_sample = later.shape.rank == 2
        dtype = stops.dtype

        def augmented(t, state):
            y, a = state[:num_y], state[num_y:2 * num_y]
            with tf.GradientTape() as tape:
                tape.watch(y + list(sources))
                f = func(t, y, args)
            vjp = tape.gradient(
                f, [y, list(sources), list(variables)], output_gradients=a,
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
        zero = tf.constant(0, tf.int32)

        # The output times the reverse solve visits, in time order (it walks them from
        # the last): `later`, and per sample every later[b, k], sorted, so that one
        # reverse solve of the whole batch passes each sample's times.
        if per_sample:
            batch, m = tf.shape(later)[0], tf.shape(later)[1]
            flat = tf.reshape(later, [-1])
            order = tf.argsort(tf.sign(stops[1] - stops[0]) * flat, stable=True)
            event_times = tf.gather(flat, order)
            rows, cols = order // m, order % m
        else:
            event_times = later
            cols = tf.range(tf.shape(later)[0])

        def arrive(e, y, a, g_later, num_fevals):
            """At output `e`: the forward state, the output's cotangent, its time gradient."""
            # Read with `tf.gather`: with times per sample, `col` and `row` come from
            # sorting the times, and `x[col]` would make XLA compile the times in as
            # constants (see `_replay`); and under XLA an empty batch has no entry to
            # slice.
            col = tf.gather(cols, e)
            out_y = [tf.gather(x, col + 1) for x in ys]
            out_g = [tf.gather(g, col + 1) for g in g_ys]
            if per_sample:
                row = tf.gather(rows, e)
                mask = [tf.reshape(tf.equal(tf.range(batch), row),
                                   [-1] + [1] * (y_n.shape.rank - 1)) for y_n in y]
                y = [tf.where(m_, out, y_n) for m_, out, y_n in zip(mask, out_y, y)]
                g_e = [tf.where(m_, g, tf.zeros_like(g)) for m_, g in zip(mask, out_g)]
                # A padded entry (its row's time repeated) has no cotangent and needs no
                # evaluation.
                at = tf.gather(order, e)  # later[row, col] is flat[at]
                before = tf.where(col > 0, tf.gather(flat, tf.maximum(at - 1, 0)), stops[0])
                padded = tf.equal(tf.gather(flat, at), before)
                g_t = tf.cond(padded, lambda: tf.zeros([], dtype),
                              lambda: _dot(g_e, func(tf.gather(event_times, e), y, args)))
                num_fevals += 1 - tf.cast(padded, tf.int32)
            else:
                y, g_e = out_y, out_g
                g_t = _dot(g_e, func(tf.gather(event_times, e), y, args))
                num_fevals += 1
            a = [a_n + g_n for a_n, g_n in zip(a, g_e)]
            # Written per event, summed onto the times after the loop: a scatter into
            # the times fails under XLA for an empty batch.
            return y, a, g_later.write(e, g_t), num_fevals

        def reverse(t1, t0, state):
            trajectory = integrate(
                solver, reverse_controller, augmented, tf.stack([t1, t0]), state,
                record=False, **kwargs,
            )
            stats = trajectory.stats
            return ([x[-1] for x in trajectory.ys], stats.num_steps, stats.num_rejected,
                    stats.num_fevals, trajectory.status, trajectory.t_final)

        def event(e, y_in, a_in, g_params, g_later, num_steps, num_rejected, num_fevals,
                  status, t_final):
            y, a, g_later, num_fevals = arrive(e, y_in, a_in, g_later, num_fevals)
            t1 = tf.gather(event_times, e)
            t0 = tf.where(e > 0, tf.gather(event_times, tf.maximum(e - 1, 0)), stops[0])
            state = y + a + g_params
            if per_sample:
                # Samples may share a time: nothing to solve between equal times.
                end, steps, rejected, fevals, code, reached = tf.cond(
                    tf.equal(t1, t0),
                    lambda: (state, zero, zero, zero, zero, t0),
                    lambda: reverse(t1, t0, state),
                )
            else:
                end, steps, rejected, fevals, code, reached = reverse(t1, t0, state)
            out = (
                e - 1,
                end[:num_y],
                end[num_y:2 * num_y],
                end[2 * num_y:],
                g_later,
                num_steps + steps,
                num_rejected + rejected,
                num_fevals + fevals,
                tf.maximum(status, code),
                tf.where(status == 0, reached, t_final),
            )
            # Reading the forward outputs and the reverse solve can lose a static batch
            # size the loop entered with (a Keras batch of known size); the values keep it.
            inputs = (e, y_in, a_in, g_params, g_later, num_steps, num_rejected, num_fevals,
                      status, t_final)
            for x, like in zip(tf.nest.flatten(out), tf.nest.flatten(inputs)):
                if tf.is_tensor(like):
                    x.set_shape(like.shape)
            return out

        state = (
            tf.shape(event_times)[0] - 1,
            list(trajectory.y_final),
            [tf.zeros_like(y) for y in y0],
            [tf.zeros_like(p) for p in params],
            tf.TensorArray(dtype, size=tf.shape(event_times)[0], element_shape=[]),
            zero, zero, zero, zero, stops[-1],
        )
        (_, _, a, g_params, g_later, num_steps, num_rejected, num_fevals, status,
         t_final) = tf.while_loop(lambda e, *_: e >= 0, event, state, parallel_iterations=1)
        g_later = g_later.stack()  # by event
        if per_sample:
            g_later = tf.reshape(tf.math.unsorted_segment_sum(g_later, order, batch * m),
                                 [batch, m])
        # The start: moving it with y0 fixed shifts the solution by -Phi f(t0, y0).
        g_t0 = -_dot(a, func(stops[0], y0, args))
        g_y0 = [a_n + g[0] for a_n, g in zip(a, g_ys)]
        if len(times) == 1:  # the stops are the output times
            g_times = [tf.concat([[g_t0], g_later], axis=0)]
        else:
            g_times = [tf.stack([g_t0, tf.zeros_like(g_t0)]), g_later]
        grads = [*g_times, *g_y0, *g_params]
        if counters is not None:
            counts = (num_steps, num_rejected, num_fevals + 1, zero)
            updates = [v.assign(c) for v, c in zip(counters, counts)]
            with tf.control_dependencies(updates):
                grads = [tf.identity(g) for g in grads]
        return grads, status, t_final

    def _reverse_solve_per_sample(self, solver, controller, func, trajectory, times, y0, args,
                                  sources, g_ys, variables, loop_kwargs, counters):
        """The adjoint's reverse solve with per-sample steps; same returns as `_reverse_solve`
        (status and where it ended per sample).

        One reverse solve of `[y, a]` per sample, from each sample's last output time to the
        start, stepping onto each of its output times, where `y` is reset to the forward
        output and `a` receives that output's cotangent (`integrate`'s `on_land`). The
        parameters' adjoint, a sum over the samples, cannot ride in a per-sample state: it
        is the quadrature `-int a^T df/dtheta dt` along the reverse solve, taken afterwards
        with the same Runge-Kutta weights over its recorded accepted steps (each step's
        stages rebuilt, one vector-Jacobian product per stage with the cotangent scaled by
        the sample's own step size, zero for a sample that did not step), so the
        parameters' gradient is excluded from the error control (the shared reverse solve
        includes it).
        """
        params = list(sources) + [tf.convert_to_tensor(v) for v in variables]
        num_y = len(y0)
        ys = trajectory.ys  # [n, batch, ...]
        stops = times[0]
        dense = len(times) > 1
        batch = tf.shape(y0[0])[0]
        rows = tf.range(batch)
        # Every output time per sample, the start included: [batch, n].
        if dense:
            later = tf.broadcast_to(times[1], tf.stack([batch, tf.shape(times[1])[-1]]))
            start = tf.broadcast_to(stops[..., :1], tf.stack([batch, 1]))
            out_times = tf.concat([start, later], axis=1)
        else:
            out_times = tf.broadcast_to(stops, tf.stack([batch, tf.shape(stops)[-1]]))
        num_out = tf.shape(out_times)[1]
        reverse_stops = tf.reverse(out_times, axis=[1])

        def augmented(t, state):
            y, a = state[:num_y], state[num_y:]
            with tf.GradientTape() as tape:
                tape.watch(y)
                f = func(t, y, args)
            vjp = tape.gradient(f, y, output_gradients=a,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return f + [-tf.convert_to_tensor(g) for g in vjp]

        def at_output(xs, k):
            """`x[k[b], b]` for each `[n, batch, ...]` x."""
            where = tf.stack([k, rows], axis=1)
            return [tf.gather_nd(x, where) for x in xs]

        def on_land(i, landed, state):
            # Stop i of the reverse solve is output num_out - 1 - i; the start (i = last)
            # keeps its cotangent for g_y0 below.
            k = num_out - 1 - tf.minimum(i, num_out - 1)
            apply = landed & (k >= 1)
            k = tf.maximum(k, 0)
            y_out, g_out = at_output(ys, k), at_output(g_ys, k)
            y = [tf.where(per_row(apply, y_n), o, y_n) for y_n, o in zip(state[:num_y], y_out)]
            a = [a_n + tf.where(per_row(apply, g), g, tf.zeros_like(g))
                 for a_n, g in zip(state[num_y:], g_out)]
            return y + a

        def tolerance(given, forward):
            if given is not None:
                return [tf.constant(given, stops.dtype)] * (2 * num_y)
            return forward + forward

        reverse_controller = dataclasses.replace(
            controller, rtol=tolerance(self.rtol, controller.rtol),
            atol=tolerance(self.atol, controller.atol))
        kwargs = dict(loop_kwargs)
        if self.max_steps is not None:
            kwargs["max_steps"] = self.max_steps
        # Each sample starts back from its last real output (the loop passes over its
        # padding, a repeat of that time); the start's own cotangent joins g_y0 below.
        last = _outputs.last_real(out_times)
        state0 = at_output(ys, last) + [
            tf.where(per_row(last > 0, g), g, tf.zeros_like(g)) for g in at_output(g_ys, last)]
        rev = integrate(solver, reverse_controller, augmented, reverse_stops, state0,
                        record=True, on_land=on_land, **kwargs)
        cp = rev.checkpoints
        a_start = [x[-1] for x in rev.ys[num_y:]]  # a(t0), before g_ys[0]

        # The parameters' quadrature over the reverse solve's accepted steps.
        tableau = solver.tableau
        count = tableau.solution_stages

        def quadrature(i, g_params):
            t, dt, accepted = cp.t[i], cp.dt[i], cp.accepted[i]
            state = [x[i] for x in cp.y]
            scale = tf.where(accepted, dt, tf.zeros_like(dt))
            safe = tf.where(tf.equal(scale, 0), tf.ones_like(scale), scale)
            k = []
            for stage in range(count):
                if stage == 0:
                    stage_state = state
                else:
                    stage_state = _weighted_sum(state, dt, tableau.a_lower[stage - 1], k)
                t_stage = t + tableau.c[stage] * dt
                y, a = stage_state[:num_y], stage_state[num_y:]
                with tf.GradientTape() as tape:
                    tape.watch(y + list(sources))
                    f = func(t_stage, y, args)
                scaled = [per_row(scale, a_n) * a_n for a_n in a]
                g_y, g_s, g_v = tape.gradient(
                    f, [y, list(sources), list(variables)], output_gradients=scaled,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
                k.append(f + [-tf.convert_to_tensor(g) / per_row(safe, g) for g in g_y])
                weight = tableau.b_sol[stage]
                if weight != 0.0:
                    g_p = [tf.convert_to_tensor(g) for g in list(g_s) + list(g_v)]
                    g_params = [x - weight * g for x, g in zip(g_params, g_p)]
            return i + 1, g_params

        _, g_params = tf.while_loop(
            lambda i, *_: i < cp.num_steps, quadrature,
            (tf.constant(0, tf.int32), [tf.zeros_like(p) for p in params]),
            parallel_iterations=1)

        # Output times: dL/dts[b, k] = <dL/dys[k, b], f(ts[b, k], ys[k, b])> for k >= 1.
        def time_gradient(k, g_later):
            g_k, y_k = [g[k] for g in g_ys], [y[k] for y in ys]
            f = func(out_times[:, k], y_k, args)
            inner = tf.add_n([tf.reduce_sum(g * x, axis=list(range(1, x.shape.rank)))
                              if x.shape.rank > 1 else g * x for g, x in zip(g_k, f)])
            return k + 1, g_later.write(k - 1, inner)

        _, g_later = tf.while_loop(
            lambda k, *_: k < num_out, time_gradient,
            (tf.constant(1, tf.int32), tf.TensorArray(stops.dtype, size=num_out - 1,
                                                      element_shape=y0[0].shape[:1])))
        g_later = tf.transpose(g_later.stack())  # [batch, n - 1]
        f0 = func(out_times[:, 0], y0, args)
        g_t0 = -tf.add_n([tf.reduce_sum(a * x, axis=list(range(1, x.shape.rank)))
                          if x.shape.rank > 1 else a * x for a, x in zip(a_start, f0)])
        g_y0 = [a_n + g[0] for a_n, g in zip(a_start, g_ys)]
        if dense:
            g_times = [tf.stack([g_t0, tf.zeros_like(g_t0)], axis=1), g_later]
            shared = [stops.shape.rank == 1, times[1].shape.rank == 1]
        else:
            g_times = [tf.concat([g_t0[:, None], g_later], axis=1)]
            shared = [stops.shape.rank == 1]
        g_times = [tf.reduce_sum(g, axis=0) if one else g for g, one in zip(g_times, shared)]
        grads = [*g_times, *g_y0, *g_params]
        stats = rev.stats
        if counters is not None:
            # The slowest sample's counts: what the batched reverse solve ran; plus the
            # quadrature's evaluations and the times' and the start's.
            fevals = tf.reduce_max(stats.num_fevals) + cp.num_steps * count + num_out
            counts = (tf.reduce_max(stats.num_steps), tf.reduce_max(stats.num_rejected), fevals,
                      tf.constant(0, tf.int32))
            updates = [v.assign(c) for v, c in zip(counters, counts)]
            with tf.control_dependencies(updates):
                grads = [tf.identity(g) for g in grads]
        return grads, rev.status, rev.t_final


def _dot(xs, ys):
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


_GRADIENTS = {"aca": ACAGradient, "naive": NaiveGradient, "adjoint": AdjointGradient,
              "mali": MALIGradient}


def get_gradient(gradient):
    """Returns a strategy from a name ("aca", "naive", "adjoint", "mali"), a strategy
    class, an instance, or a config dict `{"name": "aca", "checkpoints": 16}` (a built-in
    with its options)."""
    if isinstance(gradient, AbstractGradient):
        return gradient
    if isinstance(gradient, type) and issubclass(gradient, AbstractGradient):
        return gradient()
    if isinstance(gradient, str) and gradient.lower() in _GRADIENTS:
        return _GRADIENTS[gradient.lower()]()
    if isinstance(gradient, dict) and gradient.get("name") in _GRADIENTS:
        options = {k: v for k, v in gradient.items() if k != "name"}
        return _GRADIENTS[gradient["name"]](**options)
    raise ValueError(
        f"`gradient` must be one of {sorted(_GRADIENTS)} or an AbstractGradient. "
        f"Received: gradient={gradient!r}"
    )
