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
  `model.export`), not run eagerly: eagerly, every new function object (a lambda
  written in the call) compiles anew, seconds per call, and even a reused one costs a
  compilation that op-by-op execution does not;
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

Eager calls with `jit_compile=True` reuse their compiled functions (`reuse_key`): a new
`tf.function` per call would compile again on every call, and each compiled program
stays in TensorFlow's compilation cache for the life of the process (5 to 20 MB per
call, measured). A compiled function is reused by later calls of the same `func` object
(and the same solver, gradient options, structures and dtype); every tensor that
changes between calls (states, times, tolerances, `args`, output cotangents) is one of
its inputs, never a value closed over. Tensors `func` itself closes over are part of
the key: a `func` that closes over a new tensor each call compiles anew, correctly.
As with `tf.function`, a `func` whose Python code behaves differently from one call to
the next without being a new function object keeps the first behaviour.
"""

import inspect
import threading
import weakref

import numpy as np
import tensorflow as tf

from tfaca._internals import (
    external_captures,
    in_cond_gradient,
    in_xla_context,
    mark_accessed,
    scratch_trace,
    unfoldable_input,
)

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


class _Current:
    """Calls the `fn` that the calling thread's solve set (`compiled`), for a trace. Only
    this object refers to `fn`, and only during a call: the cache does not keep a
    solve's `func` (or its layer) alive. An object, not a lambda: TensorFlow (2.21)
    counts the traces of every `tf.function` made from one code object together and
    warns of retracing, though each of these is traced once."""

    def __init__(self):
        self.local = threading.local()

    def __call__(self, clock, *args):
        return self.local.fn(*args)


class _Reused:
    """A compiled function kept for later eager calls, with the tensors the key's `func`
    closed over (held, so that their ids cannot be reused by other tensors)."""

    def __init__(self, captured):
        self.captured = captured
        self.current = _Current()
        self.function = tf.function(self.current, jit_compile=True, autograph=False)


# key -> _Reused; an entry lives as long as the `func` its key names (`_token`).
_REUSED = {}
# id(func) -> token: the key's stand-in for `func`, which the cache does not hold.
_TOKENS = {}


def _forget(obj_id, token):
    _TOKENS.pop(obj_id, None)
    for key in [k for k in list(_REUSED) if k[0] is token]:
        _REUSED.pop(key, None)


def _token(obj):
    """A hashable stand-in for `obj` that lives as long as `obj` (TypeError if `obj`
    cannot be weakly referenced): its compiled functions are dropped with it."""
    token = _TOKENS.get(id(obj))
    if token is None:
        token = _TOKENS[id(obj)] = object()
        weakref.finalize(obj, _forget, id(obj), token)
    return token


def same_as(func, owner, tag):
    """Marks `func` as computing what every function marked with the same `owner` and
    `tag` computes, for `reuse_key` (`ODELayer` makes a new `func` per call). The
    compiled functions go when `owner` does."""
    func._tfaca_same_as = (owner, tag)


def _identity(func):
    """`(owner, method)`: what `reuse_key` tells functions apart by."""
    if hasattr(func, "_tfaca_same_as"):
        return func._tfaca_same_as
    if inspect.ismethod(func):
        return func.__self__, func.__func__
    return func, None


def derived(wrapper, func, tag):
    """Marks `wrapper`, made anew per solve around the user's `func` (a controlled
    field, a CDE's matrix-vector product), as computing what every wrapper of the same
    `func` and `tag` computes: eager calls reuse their compiled functions as they do
    for `func` itself. Returns `wrapper`."""
    owner, method = _identity(func)
    same_as(wrapper, owner, (method, tag))
    return wrapper


def reuse_key(func, f, dtype, y0, args, static, t_shape=()):
    """The key under which an eager solve's compiled functions are reused (see the
    module), or True (compile, not reused) when `func` cannot be told apart from other
    functions: it cannot be weakly referenced, or traced.

    `func`: the user's function (a bound method counts as its object and function);
    `f(t, y, args)` the flat form the loops call; `static`: hashable values that fix
    what `f` computes besides `func` (structures, solver, gradient options)."""
    owner, method = _identity(func)
    try:
        token = _token(owner)
    except TypeError:
        return True
    graph = scratch_trace(f, dtype, y0, args, t_shape)
    if graph is None:
        return True
    return _Key(token, method, static, tuple(external_captures(graph)))


class _Key(tuple):
    """`(token, method, static)`, with the tensors `func` closed over alongside, compared
    by identity when an entry is looked up (`compiled`)."""

    def __new__(cls, token, method, static, captured):
        key = super().__new__(cls, (token, method, static))
        key.captured = captured
        return key


def compiles(jit):
    """Whether `compiled(fn, jit)` compiles `fn` with XLA."""
    return bool(jit) and not in_cond_gradient()


def compiled(fn, jit, role=None):
    """`fn` as a function compiled with XLA when `jit`, else `fn` itself.

    `jit`: False, True, or an eager solve's `reuse_key`: then the compiled function is
    the one kept under that key and `role` (a hashable name of which of the solve's
    functions `fn` is), made on first use; `fn` must then take every tensor that
    changes between calls as an argument (see the module).

    Eagerly, a call also reports the variables the function reads as accessed, which
    TensorFlow does not do under `stop_recording`: the `VariableWatcher` around ACA's
    forward solve must see them to give them gradients. In a graph, the call gets one
    more input, a clock read that it ignores: TensorFlow's graph optimizer evaluates a
    call whose data inputs are all constants (a solve of constant data) ahead of time,
    uncompiled, in an executor that recurses per loop iteration, and thousands of steps
    overflow the stack (a segmentation fault, seen with 1,756 Heun-Euler steps)."""
    if not compiles(jit):
        return fn
    if isinstance(jit, _Key):
        key = (*jit, role)
        entry = _REUSED.get(key)
        if entry is None or [id(c) for c in entry.captured] != [id(c) for c in jit.captured]:
            # A new func, or one that closes over other tensors than last time: the old
            # entry (if any) goes, and with it the tensors it held.
            entry = _REUSED[key] = _Reused(jit.captured)
        function, current = entry.function, entry.current.local
    else:
        function = tf.function(lambda clock, *args: fn(*args), jit_compile=True,
                               autograph=False)
        current = None

    def call(*args):
        if not tf.executing_eagerly():
            # A data input the optimizer cannot fold (see `_internals.unfoldable_input`).
            return function(unfoldable_input(), *args)
        clock = tf.constant(0.0, tf.float64)
        if current is not None:
            current.fn = fn
        try:
            out = function(clock, *args)
            concrete = function.get_concrete_function(clock, *args)
        finally:
            if current is not None:
                current.fn = None
        mark_accessed(concrete.graph.variables)
        return out

    return call
