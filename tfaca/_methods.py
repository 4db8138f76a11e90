"""The solvers by name: what `method="dopri5"` means wherever a solver is chosen."""

from tfaca._implicit import Kvaerno3, Kvaerno5
from tfaca._solvers import ALF, RK4, AbstractSolver, Bosh3, Dopri5, Euler, HeunEuler, Midpoint, Tsit5

_SOLVERS = {
    "alf": ALF,
    "euler": Euler,
    "midpoint": Midpoint,
    "rk4": RK4,
    "heun_euler": HeunEuler,
    "bosh3": Bosh3,
    "dopri5": Dopri5,
    "tsit5": Tsit5,
    "kvaerno3": Kvaerno3,
    "kvaerno5": Kvaerno5,
}


def get_solver(method):
    """Returns a solver instance from a name ("dopri5"), a solver class, an instance, or
    a config dict `{"name": "alf", "damping": 0.8}` (a built-in with its options)."""
    if isinstance(method, AbstractSolver):
        return method
    if isinstance(method, dict) and method.get("name") in _SOLVERS:
        options = {k: v for k, v in method.items() if k != "name"}
        return _SOLVERS[method["name"]](**options)
    if isinstance(method, type) and issubclass(method, AbstractSolver):
        return method()
    if isinstance(method, str) and method.lower() in _SOLVERS:
        return _SOLVERS[method.lower()]()
    raise ValueError(
        f"`method` must be one of {sorted(_SOLVERS)} or an AbstractSolver. "
        f"Received: method={method!r}"
    )
