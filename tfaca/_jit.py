"""Compiling the solver's own loops with XLA inside a graph that is not compiled.

Keras compiles `fit` with XLA only where it decides to (`jit_compile="auto"` is off on
machines without a GPU and under every `tf.distribute` strategy). In a plain graph a
solve runs op by op through TensorFlow's executor, about 0.1 ms of overhead per trial
step; compiled, a step of a small vector field costs microseconds. So the loops (the
forward integration, ACA's replay, the adjoint's reverse solve) can each run as a
`tf.function(jit_compile=True)` of their own, called from the uncompiled graph:
`solve(..., jit_compile=...)` and `ODELayer(..., jit_compile=...)`.

The automatic rule (`jit_compile="auto"`, the default), measured on a 2-core CPU
(`benchmarks/`): compile when all of these hold

- the solve is being traced into a graph (`tf.function`, Keras' `fit`, `predict`,
  `model.export`), not run eagerly: an eager call would compile anew every time;
- the surrounding graph is not compiled already (`jit_compile=True`: nothing to add);
- the gradient is `"aca"` or `"adjoint"` (`"naive"` differentiates the loop as it was
  recorded, which XLA would turn into buffers of `max_steps` entries per
  intermediate; it is a point of comparison, not a training mode);
- the dynamics use no operation that XLA cannot compile (Python functions, strings,
  printing), and, unless a GPU is visible, no convolution: on CPU, XLA runs the
  gradient of a convolution inside a while loop 20-100x slower than TensorFlow's
  kernels (`benchmarks/xla_conv_loop.py`).

`jit_compile=True` compiles whatever the dynamics (an operation XLA cannot compile is
then an error when the graph runs), and is refused with `"naive"`; `False` never
compiles.

Errors keep their meaning: the loops return their status, and the checks that raise
(`throw=True`) run outside the compiled function, in the graph that called it.

XLA compiles a function once per shape of its inputs, and once per *value* of any input
it takes as a compile-time constant: the index of a slice `x[i]` is one, and so is any
input it is computed from. So nothing a compiled function receives may have a shape or
a constant value that follows the number of steps a solve took (a recompile costs
0.5-4 s, a stall in a training epoch): buffers are sized from `max_steps` (`_loop`),
and the loops read an entry picked by a recorded value, or by the step count, with
`tf.gather`, never `x[i]` (`tests/test_jit.py` counts the compilations).
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record as tape_record
from tensorflow.python.framework import func_graph
from tensorflow.python.ops import resource_variable_ops

from tfaca._loop import in_xla_context

# Operations whose gradient XLA runs slowly inside a while loop on CPU.
_CONVOLUTIONS = ("Conv", "DepthwiseConv")
# Operations XLA cannot compile that a vector field might contain.
_NOT_COMPILABLE = {
    "PyFunc", "PyFuncStateless", "EagerPyFunc", "PrintV2", "Print", "StringFormat",
    "AsString", "StringJoin", "NumpyFunction",
}

def check_option(value, strategy_name):
    """`jit_compile` checked: `"auto"`, True or False (a NumPy bool becomes a bool), and
    not True with the naive gradient."""
    if isinstance(value, str) and value == "auto":
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f'`jit_compile` must be "auto", True or False. Received: jit_compile={value!r}'
        )
    if value and strategy_name == "naive":
        raise ValueError(
            '`jit_compile=True` cannot be used with gradient="naive": the naive gradient '
            "differentiates the solver's loop as it was recorded, which cannot leave a "
            "function compiled on its own (TensorFlow cannot pass the loop's recorded "
            "lists out of XLA). Compile the whole computation instead "
            "(`tf.function(jit_compile=True)`, `model.compile(jit_compile=True)`), or use "
            'gradient="aca". Received: jit_compile=True, gradient="naive"'
        )
    return bool(value)


def scratch_trace(func, dtype, y0, args, t_shape=()):
    """`func(t, y, args)` (flat lists) traced once into a scratch graph of placeholders,
    with nothing recorded and nothing run; None if it cannot be traced (it calls
    `.numpy()`, say)."""
    graph = func_graph.FuncGraph("tfaca_probe")
    try:
        with tape_record.stop_recording(), graph.as_default():
            t = tf.compat.v1.placeholder(dtype, t_shape)
            y = [tf.compat.v1.placeholder(x.dtype, x.shape) for x in y0]
            a = [tf.compat.v1.placeholder(x.dtype, x.shape) for x in args]
            func(t, y, a)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return graph


def operation_types(func, dtype, y0, args, t_shape=()):
    """The types of the operations `func(t, y, args)` builds, nested functions and loop
    bodies included (`scratch_trace`). None if it cannot be traced."""
    graph = scratch_trace(func, dtype, y0, args, t_shape)
    if graph is None:
        return None
    definition = graph.as_graph_def()
    types = {node.op for node in definition.node}
    for function in definition.library.function:
        types.update(node.op for node in function.node_def)
    return types


def decide(option, func, dtype, y0, args, strategy_name, t_shape=()):
    """Whether the solve's loops run as functions compiled with XLA (see the module);
    `option` as `check_option` returns it."""
    if in_xla_context():
        return False  # compiled with the graph around them already
    if option is not True and option is not False:  # "auto"
        if tf.executing_eagerly() or strategy_name == "naive":
            return False
        types = operation_types(func, dtype, y0, args, t_shape)
        if types is None or types & _NOT_COMPILABLE:
            return False
        if not tf.config.list_logical_devices("GPU") and any(
            op.startswith(_CONVOLUTIONS) for op in types
        ):
            return False
        return True
    return option


def compiled(fn, jit):
    """`fn` as a function compiled with XLA when `jit`, else `fn` itself.

    Eagerly, a call also reports the variables the function reads as accessed, which
    TensorFlow does not do under `stop_recording`: the `VariableWatcher` around ACA's
    forward solve must see them to give them gradients. In a graph, the call gets one
    more input, a clock read that it ignores: TensorFlow's graph optimizer evaluates a
    call whose data inputs are all constants (a solve of constant data) ahead of time,
    uncompiled, in an executor that recurses per loop iteration, and thousands of steps
    overflow the stack (a segmentation fault, seen with 1,756 Heun-Euler steps)."""
    if not jit:
        return fn
    function = tf.function(lambda clock, *args: fn(*args), jit_compile=True, autograph=False)

    def call(*args):
        if not tf.executing_eagerly():
            # A data input the optimizer cannot know (a clock read), unused inside.
            return function(tf.raw_ops.Timestamp(), *args)
        clock = tf.constant(0.0, tf.float64)
        out = function(clock, *args)
        for v in function.get_concrete_function(clock, *args).graph.variables:
            resource_variable_ops.variable_accessed(v)
        return out

    return call
