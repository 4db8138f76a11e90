"""The continuous adjoint (Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary
Differential Equations", NeurIPS 2018): keep only the outputs and solve the adjoint system
backwards in time. Memory O(state), but the reverse solve of `y` drifts from the forward
one (Zhuang et al. 2020, Table 1, Fig. 4), and the gradient with it. Its gradient cannot
be differentiated again: doing so raises."""

import dataclasses

import tensorflow as tf

from tfaca import _outputs
from tfaca._gradients._base import (
    SECOND_ORDER, AbstractGradient, compiled, dot, nan_where, forward_solve, loop_options, solve_with_custom_gradient,
    sources_with, times_of, unpack,
)
from tfaca._loop import integrate, raise_on_failure
from tfaca._solution import Stats
from tfaca._solvers import _weighted_sum, per_row


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

    def solve(self, solver, controller, func, plan, y0, args, *, per_sample=False, throw=True,
              jit=False, **loop_kwargs):
        options = loop_options(controller, dict(loop_kwargs, per_sample=per_sample))
        # The reverse solve needs the outputs and the end state, not the steps.
        run = forward_solve(solver, func, jit, record=False, checkpoints=False)

        def forward(times, y0, args):
            return run(times, y0, args, options)

        def backward(trajectory, times, y0, sources, g_ys, variables, differentiable):
            # As in ACA's replay; the counters are an argument too: a compiled function
            # reused by another instance's solve counts into that instance's.
            method = self._reverse_solve_per_sample if per_sample else self._reverse_solve

            def reverse_solve(trajectory, times, y0, g_ys, args, options, counters):
                controller, loop_kwargs = unpack(options)
                return method(solver, controller, func, trajectory, times, y0, args,
                              sources_with(sources, args), g_ys, variables, loop_kwargs,
                              counters)

            reverse = compiled(reverse_solve, jit, ("reverse",))
            grads, status, t_final = reverse(trajectory, times, y0, g_ys, args, options,
                                             self.backward_stats)
            if throw:
                return raise_on_failure(status, t_final, grads, "in the adjoint's reverse solve")
            return nan_where(tf.reduce_any(status != 0), grads)

        refusal = SECOND_ORDER.format(
            what="the adjoint cannot give: its reverse solve takes the forward outputs "
            "as constants", instead='Use gradient="aca" (exact) or "naive".')
        trajectory = solve_with_custom_gradient(
            forward, backward, func, times_of(plan), y0, args, second_order=refusal,
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
                              lambda: dot(g_e, func(tf.gather(event_times, e), y, args)))
                num_fevals += 1 - tf.cast(padded, tf.int32)
            else:
                y, g_e = out_y, out_g
                g_t = dot(g_e, func(tf.gather(event_times, e), y, args))
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
        g_t0 = -dot(a, func(stops[0], y0, args))
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


