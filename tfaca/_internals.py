"""TensorFlow and Keras internals tfaca relies on, in one place.

Written for TensorFlow 2.21 and Keras 3.15. Every private import of the package
(`tensorflow.python...`, underscored attributes of TensorFlow's graphs and of Keras
layers) and every workaround of how TensorFlow or Keras behave inside is here, one
section each, saying what it works around and how to check it on an upgrade. On an
upgrade this is the file to audit: read each section's "On upgrade", then run
`tests/test_gradients.py` (with the control-flow cases: a solve in `tf.scan`, a Keras RNN
cell, a `tf.cond` branch), `tests/test_aca.py`, `tests/test_jit.py`, `tests/test_layers.py`
and `tests/test_layers_training.py`.
"""

import contextlib

import tensorflow as tf
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import record as _record
from tensorflow.python.framework import func_graph as _func_graph
from tensorflow.python.ops import cond_v2 as _cond_v2
from tensorflow.python.ops import control_flow_util as _control_flow_util
from tensorflow.python.ops import resource_variable_ops as _resource_variable_ops
from tensorflow.python.ops import while_v2 as _while_v2

# --------------------------------------------------------------------------------------
# TensorFlow: is XLA compiling what is being built?
#
# Works around: TensorFlow has no public way to ask whether ops built now will be
# compiled by XLA (`tf.function(jit_compile=True)`, Keras' `jit_compile=True`). tfaca
# must know, since XLA has no run-time assertions (a failure is then reported by
# `Solution.status` and NaN, never by an `Assert` that XLA would reject) and a loop
# inside a compiled graph must not be compiled again.
# On upgrade: `control_flow_util.GraphOrParentsInXlaContext` still exists and is True
# inside `tf.function(jit_compile=True)` (tests/test_jit.py, tests/test_gradients.py).
# --------------------------------------------------------------------------------------


def in_xla_context():
    """Whether ops built now will be compiled by XLA (`jit_compile=True`)."""
    return _control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


# --------------------------------------------------------------------------------------
# TensorFlow: the tapes, from the inside.
#
# Works around: the public API can pause one `tf.GradientTape` (`tape.stop_recording()`)
# but not every tape and `tf.autodiff.ForwardAccumulator` at once, cannot ask whether
# any of them is recording, nor list the variables a computation reads. ACA's forward
# solve must run unrecorded (its gradient comes from `tf.custom_gradient`, and a tape
# recording the loop would keep every trial step alive), and the variables it read must
# become inputs of the custom gradient. `tf.custom_gradient` itself uses
# `VariableWatcher` and `stop_recording` (tensorflow/python/ops/custom_gradient.py).
# On upgrade: `tensorflow.python.eager.record` still defines `stop_recording`,
# `could_possibly_record`, `should_record_backprop` and `VariableWatcher`
# (importing this module fails if not), and behave as named: tests/test_gradients.py;
# `pywrap_tfe.TFE_Py_TapeSetIsStopped`, `...RestartOnThread` and `...StopOnThread` (what
# `stop_recording` itself calls) still exist: tests/test_implicit.py (ACA's forward).
# --------------------------------------------------------------------------------------

stop_recording = _record.stop_recording  # context: no tape or accumulator records
could_possibly_record = _record.could_possibly_record  # () -> whether any tape is active
should_record_backprop = _record.should_record_backprop  # (tensors) -> watched by a tape
VariableWatcher = _record.VariableWatcher  # context: `.watched_variables()` read inside


@contextlib.contextmanager
def recording():
    """Tapes record inside, also within `stop_recording` (an implicit solver's Jacobian,
    taken with its own tape during ACA's unrecorded forward solve). A tape around the
    solve then records that computation too, disconnected from the solve's outputs."""
    stopped = pywrap_tfe.TFE_Py_TapeSetIsStopped()
    if stopped:
        pywrap_tfe.TFE_Py_TapeSetRestartOnThread()
    try:
        yield
    finally:
        if stopped:
            pywrap_tfe.TFE_Py_TapeSetStopOnThread()


# --------------------------------------------------------------------------------------
# TensorFlow: variable reads that TensorFlow does not report.
#
# Works around: reading a variable inside `stop_recording`, or inside a compiled
# function called eagerly, does not tell the `VariableWatcher` around it, nor the
# `tf.function` being traced (a SavedModel export, Keras' `model.export`, saves only
# the variables its functions use, and refuses a captured handle of any other:
# "untracked resource"). `mark_accessed` records the access as a read would.
# On upgrade: `resource_variable_ops.variable_accessed(v)` still exists; tests/test_jit.py
# (eager jit_compile=True gradients) and the export tests of tests/test_layers.py.
# --------------------------------------------------------------------------------------


def mark_accessed(variables):
    """Reports each of `variables` as read, to tapes, watchers and the function traced."""
    for v in variables:
        _resource_variable_ops.variable_accessed(v)


# --------------------------------------------------------------------------------------
# TensorFlow: function graphs (`FuncGraph`).
#
# Works around: TensorFlow has no public way to trace a Python function into a graph
# without running it or recording it (tfaca lists the operations `func` builds, for
# `jit_compile="auto"`, and the tensors it closes over, which become inputs of the
# custom gradient: JAX's `closure_convert`), nor to ask which function graph is being
# built and capture a tensor into it.
# On upgrade: `func_graph.FuncGraph(name)` still builds a graph usable with
# `as_default()`, with `external_captures` and `capture(tensor)`.
# --------------------------------------------------------------------------------------


def scratch_trace(func, dtype, y0, args, t_shape=()):
    """`func(t, y, args)` (flat lists) traced once into a scratch graph of placeholders,
    with nothing recorded and nothing run; None if it cannot be traced (it calls
    `.numpy()`, say)."""
    graph = _func_graph.FuncGraph("tfaca_probe")
    try:
        with stop_recording(), graph.as_default():
            t = tf.compat.v1.placeholder(dtype, t_shape)
            y = [tf.compat.v1.placeholder(x.dtype, x.shape) for x in y0]
            a = [tf.compat.v1.placeholder(x.dtype, x.shape) for x in args]
            func(t, y, a)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return graph


def external_captures(graph):
    """The outer tensors a `scratch_trace` graph captured (those `func` closes over)."""
    return list(graph.external_captures)


def function_graph():
    """The function graph being built (a `tf.function`, a loop body, a `tf.cond`
    branch), or None eagerly and in a plain TF1 graph. Its `capture(tensor)` brings an
    outer tensor in."""
    graph = tf.compat.v1.get_default_graph()
    return graph if isinstance(graph, _func_graph.FuncGraph) else None


# --------------------------------------------------------------------------------------
# TensorFlow: gradients of `tf.cond` branches and `tf.while_loop` bodies.
#
# Works around: two failures of TensorFlow 2.21 when a solve sits in a loop body (a
# Keras RNN cell, `tf.scan`) or a `tf.cond` branch, and its backward pass is built in
# TensorFlow's while- or cond-gradient graph (tensorflow/tensorflow#50170):
# - a function compiled on its own (`_jit.compiled`) cannot be called in the gradient
#   of a `tf.cond` branch (`in_cond_gradient`: the caller then runs uncompiled);
# - an eager variable handle captured directly into such a graph fails
#   (`route_handles_through_forward_graphs`).
# On upgrade: `while_v2._WhileBodyGradFuncGraph`, `cond_v2._CondGradFuncGraph`, their
# `_forward_graph` and `_function_captures` (`by_val_internal`, `pop`,
# `add_or_replace`) still exist; then drop these and see whether the scan, RNN and
# cond tests of tests/test_gradients.py pass without them (#50170 may be fixed).
# --------------------------------------------------------------------------------------


def _function_graphs():
    """The function graphs being built, innermost first."""
    graphs = []
    graph = tf.compat.v1.get_default_graph()
    while isinstance(graph, _func_graph.FuncGraph):
        graphs.append(graph)
        graph = getattr(graph, "outer_graph", None)
    return graphs


def in_cond_gradient():
    """Whether the graph being built is (inside) the gradient of a `tf.cond` branch.

    There a compiled function is not called: TensorFlow 2.21 marks the graph that calls
    it as an XLA context for the call, so the gradient graph captures the forward
    branch's tensors that the call takes as raw XLA intermediates, which the uncompiled
    `tf.cond` around it never outputs ("Could not find external tensor capture").
    """
    return any(isinstance(g, _cond_v2._CondGradFuncGraph) for g in _function_graphs())  # noqa: SLF001


def route_handles_through_forward_graphs(handles):
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
    for graph in reversed(_function_graphs()):
        if isinstance(graph, _while_v2._WhileBodyGradFuncGraph):  # noqa: SLF001
            forward = graph._forward_graph._function_captures  # noqa: SLF001
            routes = [(h, forward.by_val_internal.get(id(h))) for h in handles]
        elif isinstance(graph, _cond_v2._CondGradFuncGraph):  # noqa: SLF001
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


# --------------------------------------------------------------------------------------
# TensorFlow: Grappler's constant folding of function calls.
#
# Works around: in a graph, TensorFlow's optimizer evaluates ahead of time a function
# call whose data inputs are all constants (a solve of constant data), uncompiled, in
# an executor that recurses per loop iteration: thousands of steps overflow the stack
# (a segmentation fault, seen with 1,756 Heun-Euler steps). A clock read, which the
# optimizer cannot know, given to the call as one more input (unused inside) stops it.
# On upgrade: no test covers it (the failure is a segfault): solve constant data with
# `method="heun_euler", rtol=1e-8` (thousands of steps) in a plain `tf.function` with
# `jit_compile=True`, with `unfoldable_input` returning a constant, and see if it crashes.
# --------------------------------------------------------------------------------------


def unfoldable_input():
    """A scalar that Grappler cannot fold into a constant: an input that keeps a call of
    a compiled function from being evaluated ahead of time."""
    return tf.raw_ops.Timestamp()


# --------------------------------------------------------------------------------------
# Keras: inputs cast to the compute dtype.
#
# Works around: Keras' `Layer.__call__` (3.15) casts every floating input to the
# layer's compute dtype when the private flag `_convert_input_args` is set (the
# default), times included: under a mixed policy the time 41.7 would become 41.6875
# (float16) or 41.75 (bfloat16), and close times would merge into padding. `ODELayer`
# clears the flag and casts its state itself, as Keras would (`cast_input`), leaving
# the times alone.
# On upgrade: `Layer.__call__` still reads `self._convert_input_args` and
# `DTypePolicy.convert_input(x, autocast, dtype)` still exists (keras/src/layers/layer.py);
# tests/test_layers.py::test_mixed_precision_keeps_the_times_precision.
# --------------------------------------------------------------------------------------


def keep_inputs_uncast(layer):
    """Stops Keras from casting `layer`'s call inputs (see `cast_input`)."""
    layer._convert_input_args = False  # noqa: SLF001


def cast_input(layer, x, autocast):
    """`x` converted as Keras' `Layer.__call__` converts an input: to a tensor, cast to
    the compute dtype when `autocast` (and floating)."""
    return layer.dtype_policy.convert_input(x, autocast, layer.input_dtype)


# --------------------------------------------------------------------------------------
# Keras: the sublayers of a layer, their seed generators and added losses.
#
# Works around: Keras 3.15 has no public way to list every nested layer of a layer
# (`_flatten_layers`), the `SeedGenerator`s each tracks (`_seed_generators`), or the
# losses a layer added by `add_loss` in a call (`_losses`; the public `losses` also holds
# the weight regularizers and cannot be edited). `ODELayer` resets the generators so
# that every evaluation of the dynamics draws the same numbers, and refuses (and
# removes) losses added inside the solver's loop.
# On upgrade: `Layer._flatten_layers(include_self=True)`, `Layer._seed_generators` and
# `Layer._losses` (a list that `add_loss` extends) still exist (keras/src/layers/layer.py);
# the dropout and added-loss tests of tests/test_layers_training.py.
# --------------------------------------------------------------------------------------


def sublayers(layer):
    """`layer` and every layer nested in it, each once."""
    return list(layer._flatten_layers(include_self=True))  # noqa: SLF001


def seed_generators(layer):
    """Every `keras.random.SeedGenerator` that `layer` or one of its sublayers tracks."""
    found = {}
    for sublayer in sublayers(layer):
        for generator in getattr(sublayer, "_seed_generators", ()):
            found.setdefault(id(generator), generator)
    return list(found.values())


def added_losses(layer):
    """The list of losses `layer` itself added by `add_loss` (Keras' own list: deleting
    from it removes them)."""
    return layer._losses  # noqa: SLF001
