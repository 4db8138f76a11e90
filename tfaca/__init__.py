"""tfaca: neural ordinary differential equations for TensorFlow and Keras, with exact,
memory-light gradients by the adaptive checkpoint adjoint (ACA) method."""

from tfaca._cde import cdeint, solve_cde
from tfaca._control import PIDController, StepSizeController
from tfaca._gradients import (
    AbstractGradient,
    ACAGradient,
    AdjointGradient,
    MALIGradient,
    NaiveGradient,
    get_gradient,
)
from tfaca._events import Event
from tfaca._layers import ODELayer
from tfaca._odeint import odeint, solve
from tfaca._series import CDELayer, ODERNNCell
from tfaca._paths import AbstractPath, CubicPath, HermitePath, LinearPath, RectilinearPath
from tfaca._solution import Solution, SolveError, Stats, Status
from tfaca._solvers import (
    ALF,
    RK4,
    AbstractSolver,
    Bosh3,
    Dopri5,
    Euler,
    HeunEuler,
    Midpoint,
    Tsit5,
)
from tfaca._implicit import AbstractImplicitSolver, Kvaerno3, Kvaerno5
from tfaca._methods import get_solver
from tfaca._tableau import ButcherTableau

__version__ = "0.1.0"

__all__ = [
    "ALF",
    "AbstractPath",
    "ACAGradient",
    "AbstractGradient",
    "AbstractImplicitSolver",
    "AbstractSolver",
    "AdjointGradient",
    "Bosh3",
    "CDELayer",
    "CubicPath",
    "ButcherTableau",
    "Dopri5",
    "Euler",
    "Event",
    "HermitePath",
    "HeunEuler",
    "Kvaerno3",
    "Kvaerno5",
    "LinearPath",
    "MALIGradient",
    "Midpoint",
    "NaiveGradient",
    "ODELayer",
    "ODERNNCell",
    "PIDController",
    "RK4",
    "RectilinearPath",
    "Solution",
    "SolveError",
    "Stats",
    "Status",
    "StepSizeController",
    "Tsit5",
    "get_gradient",
    "cdeint",
    "get_solver",
    "odeint",
    "solve",
    "solve_cde",
]
