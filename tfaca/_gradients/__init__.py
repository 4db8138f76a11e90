"""Gradient strategies: how the derivative of a solve with respect to its inputs is found.

One module per strategy, each running the one loop (`_loop.integrate`) forward:

- `_aca`: the adaptive checkpoint adjoint (default) and its checkpoint budget;
- `_mali`: MALI, for the invertible ALF solver, keeping no states;
- `_naive`: backpropagation through the whole loop;
- `_adjoint`: the continuous adjoint;

and `_base`, the forward solve and the one `tf.custom_gradient` they all go through.
"""

from tfaca._gradients._aca import ACAGradient
from tfaca._gradients._adjoint import AdjointGradient
from tfaca._gradients._base import AbstractGradient
from tfaca._gradients._mali import MALIGradient
from tfaca._gradients._naive import NaiveGradient

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
