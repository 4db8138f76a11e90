"""What every gradient strategy shares: the forward solve, and the one `tf.custom_gradient`.

A strategy (`_aca`, `_mali`, `_naive`, `_adjoint`) runs the one loop (`_loop.integrate`)
forward and says how its backward pass goes. What `func` depends on reaches the gradient
whichever way it comes in: `args`, the variables it reads (found by a `VariableWatcher`,
as `tf.custom_gradient` does), and tensors it closes over that a tape is watching (found
by tracing `func` once into a scratch graph and listing its captures, the idea of JAX's
`closure_convert`). All of them become explicit inputs of the one `tf.custom_gradient`,
in `solve_with_custom_gradient`; no variable handle passes through it, which is what
lets a solve sit inside a `tf.while_loop` (a Keras RNN cell, `tf.scan`) and still be
differentiated.
"""

import dataclasses
import math

import tensorflow as tf

from tfaca import _outputs
from tfaca._control import StepSizeController
from tfaca._internals import (
    VariableWatcher, could_possibly_record, external_captures, function_graph, in_xla_context,
    mark_accessed, route_handles_through_forward_graphs, scratch_trace, should_record_backprop,
    stop_recording,
)
from tfaca._jit import compiled
from tfaca._loop import graph_assert, integrate


class AbstractGradient:
    """Base class of gradient strategies: `solve` returns a `Trajectory` whose `ys` carry
    the strategy's gradient."""

    name = None
    # Whether `solve` takes an event (`loop_kwargs["event"]`), its state's gradient included.
    supports_events = False

    def options(self):
        """The constructor arguments, as a dict (empty for strategies without any)."""
        return {}

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        """Integrates `func(t, y, args)` (flat lists) and returns a `Trajectory` whose `ys`
        are the outputs that `plan` (an `_outputs.Plan`) asks for.

        `per_sample`: one group of steps per sample of the batch (`_loop.integrate`).
        `throw=False`: failures in the backward pass make the gradients NaN instead of
        raising (the forward's status is the caller's to report). `jit`: run the loops
        as functions compiled with XLA (`_jit.compiled`: False, True, or an eager
        call's key under which they are reused)."""
        raise NotImplementedError

    def __repr__(self):
        given = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if v is not None)
        return f"{type(self).__name__}({given})"


def run_forward(solver, controller, f, plan, y0, *, record, loop_kwargs, args=()):
    """The forward solve of every strategy: the loop over the plan's stops, saving the
    outputs it interpolates (the start included) as its steps cover them; an event's
    condition is evaluated with `args`."""
    if loop_kwargs.get("event") is not None:
        loop_kwargs = dict(loop_kwargs, event=loop_kwargs["event"].bind(args))
    saves = None
    if plan.dense:
        saves = _outputs.output_rows(plan, loop_kwargs.get("per_sample", False),
                                     tf.shape(y0[0])[0])
    return integrate(solver, controller, f, plan.stops, y0, record=record, saves=saves,
                     **loop_kwargs)


def times_of(plan):
    """The time tensors a solve's gradient is taken for: the stops, and the interpolated
    output times when there are any."""
    return [plan.stops] + ([plan.ts] if plan.dense else [])


def plan_of(times):
    """The plan whose `_times` are `times`."""
    return _outputs.Plan(stops=times[0], ts=times[1] if len(times) > 1 else None)


# The functions a strategy compiles (`_jit.compiled`) take every tensor that changes from
# one call to the next as an argument, never closed over, so that eager calls can reuse
# them: the controller and loop options as one `options` argument (its Python values,
# `max_steps` say, key the function's traces), the `args` (and with them the floating
# ones among the `sources`), the times. What they close over is fixed by `jit`'s key:
# `func` and the tensors it closes over, the solver, the strategy's options.


def loop_options(controller, loop_kwargs):
    """The controller and the loop's options as a compiled function's argument."""
    fields = {f.name: getattr(controller, f.name) for f in dataclasses.fields(controller)}
    return {"controller": fields, "loop": dict(loop_kwargs)}


def unpack(options):
    return StepSizeController(**options["controller"]), dict(options["loop"])


def sources_with(sources, args):
    """`sources` (the floating `args`, then the tensors `func` closes over) with the
    floating entries of `args` in place of the first ones."""
    floating = [a for a in args if a.dtype.is_floating]
    return floating + list(sources[len(floating):])


def forward_solve(solver, func, jit, *, record, states=None, checkpoints=True):
    """The forward solve as `forward(times, y0, args, options)`, compiled when `jit`:
    keeping `states` (`integrate`) when it records, and dropping the checkpoints from the
    result unless `checkpoints`."""

    def run(times, y0, args, options):
        controller, loop_kwargs = unpack(options)
        if record and states is not None:
            loop_kwargs["states"] = states
        trajectory = run_forward(solver, controller, lambda t, y: func(t, y, args),
                                 plan_of(times), y0, record=record, loop_kwargs=loop_kwargs,
                                 args=args)
        return trajectory if checkpoints else trajectory._replace(checkpoints=None)

    return compiled(run, jit, ("forward", record, states, checkpoints))


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
    if tf.executing_eagerly() and not could_possibly_record():
        return [], []
    graph = scratch_trace(func, times[0].dtype, y0, args, t_shape)
    if graph is None:
        return [], []
    known = {id(x) for x in [*times, *y0, *args]}
    captures = external_captures(graph)
    sources = [
        c
        for c in captures
        if c.dtype.is_floating and id(c) not in known and should_record_backprop([c])
    ]
    handles = [c for c in captures if c.dtype == tf.resource and hasattr(c, "numpy")]
    return sources, handles


def _refuse_differentiation(tensors, message):
    """Identity on `tensors` whose own gradient raises `message` (NotImplementedError)."""

    @tf.custom_gradient
    def guard(*xs):
        def grad(*_):
            raise NotImplementedError(message)

        return [tf.identity(x) for x in xs], grad

    return list(guard(*tensors)) if tensors else []


SECOND_ORDER = (
    "The gradient of a tfaca solve was differentiated again (a second derivative, a "
    "Hessian-vector product or a gradient penalty), which {what}. {instead}"
)


def solve_with_custom_gradient(forward, backward, func, times, y0, args, *, second_order,
                                written=(), t_shape=()):
    """Runs `forward` with no tape recording and gives its outputs `backward` as gradient.

    `times`: a list of time tensors (`times_of(plan)`). `forward(times, y0, args) ->
    Trajectory`. `backward(trajectory, times, y0, sources, g_ys, variables,
    differentiable, g_event)` returns the gradients of each of `times`, each `y0`, each
    source and each variable, as one flat list in that order, where `sources` are the
    floating `args` followed by the watched tensors `func` closes over,
    `differentiable` says that a tape records the backward pass, and `g_event` are the
    cotangents of an event's states (`Trajectory.found.y`, outputs too), or None. `second_order`: a
    message for when the strategy's gradient cannot be differentiated, or None when the
    differentiable backward is exact. `written`: variables the backward pass assigns
    (the adjoint's counters). `tf.custom_gradient` lives only here.
    """
    graph = function_graph()
    if graph is not None:
        # Inputs from a graph around this one (a tf.cond branch's input from the loop
        # around it) are captured here, where the backward pass, built in the branch's
        # gradient graph, can reach them; it cannot reach the outer graph's tensors.
        times, y0, args = ([graph.capture(x) for x in xs] for xs in (times, y0, args))
    with stop_recording(), VariableWatcher() as watcher:
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
        mark_accessed(written)
    sources = [a for a in args if a.dtype.is_floating] + closed_over

    num_times = len(times)
    event_states = list(trajectory.found.y) if trajectory.found else []
    outputs = list(trajectory.ys) + event_states

    @tf.custom_gradient
    def attach(*inputs):
        times = list(inputs[:num_times])

        def grad(*g_outputs):
            g_outputs = [_zeros_if_none(g, y) for g, y in zip(g_outputs, outputs)]
            g_ys = g_outputs[:len(trajectory.ys)]
            g_event = g_outputs[len(trajectory.ys):] if event_states else None
            recording = could_possibly_record()
            route_handles_through_forward_graphs(handles)
            grads = backward(
                trajectory, times, y0, sources, g_ys, variables,
                recording and second_order is None, g_event,
            )
            if second_order is not None:
                grads = _refuse_differentiation(grads, second_order)
            elif not recording and not tf.executing_eagerly():
                # Only `tf.gradients` can differentiate what no tape recorded.
                grads = _refuse_differentiation(grads, SECOND_ORDER.format(
                    what="only a GradientTape active while the first gradient is taken "
                    "can follow", instead="Take both derivatives with nested "
                    "tf.GradientTape()s."))
            return grads

        return outputs, grad

    # Variables enter as their values read here: the gradient of a read reaches the
    # variable, and no resource handle crosses the custom gradient (handles inside a
    # tf.while_loop cannot, TensorFlow's "internal_captures" error).
    reads = [tf.convert_to_tensor(v) for v in variables]
    out = list(attach(*times, *y0, *sources, *reads))
    ys = out[:len(trajectory.ys)]
    if event_states:
        trajectory = trajectory._replace(found=trajectory.found._replace(y=out[len(ys):]))
    return trajectory._replace(ys=ys)


def differs(ys, recorded, relative, also=None):
    """Whether any component of `ys` differs from `recorded` by more than `relative` times
    the component's largest magnitude (in `ys`, `recorded`, and `also` if given)."""
    out = tf.constant(False)
    for n, (y, r) in enumerate(zip(ys, recorded)):
        scale = tf.maximum(tf.reduce_max(tf.abs(r)), tf.reduce_max(tf.abs(y)))
        if also is not None:
            scale = tf.maximum(scale, tf.reduce_max(tf.abs(also[n])))
        out |= tf.reduce_max(tf.abs(y - r)) > relative * scale
    return out


NOT_REPRODUCED = (
    "ACA's backward pass did not reproduce the forward solve: replaying accepted step "
    "{step} gave another state than the forward pass accepted. `func` must be a "
    "deterministic function of (t, y): it draws random numbers (Dropout, noise layers, "
    "tf.random) or reads state that changed after the forward pass. tfaca.ODELayer "
    "draws Keras random layers once per call; with tfaca.solve, draw the randomness "
    "outside `func` and pass it in `args`, or use gradient=\"naive\"."
)


DRIFTED = (
    "MALI's backward pass did not rebuild the start of the solve: inverting the {steps} "
    "accepted ALF steps from the end gave a y0 off by more than sqrt(eps) relative, so "
    "the gradient would be taken along other states. The inverse step magnifies rounding "
    "by |1 / (1 - 2 damping)| per step when damping != 1 (use damping=1), float32 "
    "rounding builds up over very many steps (use float64, or fewer steps), or `func` is "
    "not a deterministic function of (t, y). gradient=\"naive\" with method=\"alf\", or a "
    "Runge–Kutta method with ACA, keep the states instead of rebuilding them."
)


def check_replay(mismatch, grads, throw, message=NOT_REPRODUCED):
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
    return nan_where(bad, grads)


def nan_where(failed, grads):
    """`grads`, all NaN where `failed` (a scalar bool): a gradient that could not be
    computed reads as one. A gradient of a non-floating dtype (an integer variable that
    `func` reads, a counter say) has no NaN and stays as it is (zero)."""
    return [tf.where(failed, tf.constant(float("nan"), g.dtype), g) if g.dtype.is_floating
            else g for g in grads]


def reproduction_tolerance(dtype, func):
    """How closely (relative) a replayed step must reproduce the recorded state: `sqrt(eps)`
    of the solve's `dtype`, or of the least precise dtype `func` computed in (a float16
    Keras model in a float32 solve: XLA may fuse its float16 operations differently in the
    replay than in the forward loop, and each rounding to float16 moves it by ~5e-4)."""
    dtypes = {dtype, *getattr(func, "precisions", ())}
    eps = max(float(tf.experimental.numpy.finfo(d.as_numpy_dtype).eps) for d in dtypes)
    return math.sqrt(eps)


def accumulate(totals, grads):
    """`totals` plus a step's `grads`. A `tf.IndexedSlices` gradient (the rows of a path's
    coefficients that the step's evaluations gathered) is added into those rows alone,
    never made dense per step."""
    out = []
    for total, g in zip(totals, grads):
        if isinstance(g, tf.IndexedSlices):
            out.append(tf.tensor_scatter_nd_add(total, g.indices[:, None], g.values))
        else:
            out.append(total + g)
    return out


def dot(xs, ys):
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


