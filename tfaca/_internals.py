"""TensorFlow and Keras internals tfaca relies on, in one place.

Written for TensorFlow 2.21 and Keras 3.15. Each function below names what it works
around; on an upgrade, this is the file to audit.
"""

import tensorflow as tf
from tensorflow.python.framework import func_graph
from tensorflow.python.ops import cond_v2, control_flow_util, while_v2


def in_xla_context():
    """Whether ops built now will be compiled by XLA (`jit_compile=True`): TensorFlow has no
    public way to ask (`control_flow_util.GraphOrParentsInXlaContext`, TF 2.21)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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
