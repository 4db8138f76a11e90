"""What a solve returns: the solution, its statistics, and result codes that explain themselves."""

import enum
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf


class Status(enum.IntEnum):
    """Result of a solve. `Solution.status` holds one of these as an int32 tensor.

    `str(status)` and f-strings give the name (`"SUCCESS"`), `int(status)` the code;
    `Status.name_of(sol.status)` names the codes of a status tensor.
    """

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    DT_UNDERFLOW = 2
    NONFINITE = 3
    EVENT = 4

    @property
    def failed(self):
        """Whether the code reports a failure (SUCCESS and EVENT do not)."""
        return self not in (Status.SUCCESS, Status.EVENT)

    @property
    def message(self):
        return _MESSAGES[self]

    # Python 3.11's IntEnum prints the number; a status reads better by its name.
    def __str__(self):
        return self.name

    def __format__(self, spec):
        return format(self.name, spec)

    @classmethod
    def name_of(cls, status):
        """The name of a status code: a `str` for a scalar (a `Status`, an int, a scalar
        tensor), a list of them for a `[batch]` status (`per_sample=True`), nested
        lists for more axes. It reads values, so eagerly or from NumPy, not inside a
        `tf.function`.

        Example: `tfaca.Status.name_of(sol.status)` -> `['SUCCESS', 'NONFINITE']`.
        """
        if tf.is_tensor(status) and not hasattr(status, "numpy"):
            raise TypeError(
                "`status` must be a value: `Status.name_of` runs eagerly, not inside a "
                "tf.function. Received: a symbolic tensor "
                f"{status!r}. Return the status from the function and name it after."
            )
        codes = np.asarray(status.numpy() if hasattr(status, "numpy") else status)
        if codes.dtype.kind not in "iu":
            raise TypeError(f"`status` must hold integer codes. Received: status={status!r}")
        if codes.ndim == 0:
            return cls(int(codes)).name
        return [cls.name_of(code) for code in codes]


_MESSAGES = {
    Status.SUCCESS: "The solve reached the last output time.",
    Status.MAX_STEPS_REACHED: (
        "The solver reached `max_steps` (trial steps, accepted or rejected) before the last "
        "output time. Increase `max_steps`, loosen `rtol`/`atol`, or check that the "
        "problem is not stiff (an explicit solver needs tiny steps on stiff problems)."
    ),
    Status.DT_UNDERFLOW: (
        "The step size underflowed: the error control rejected every step until the step "
        "was too small to advance time, or a step of `min_step`. The solution may have a "
        "singularity or a discontinuity here (pass its time in `jump_ts`), or "
        "`rtol`/`atol` are tighter than the floating-point precision allows (use float64 "
        "or loosen them); `force_min_step=True` accepts steps of `min_step` and counts "
        "them (`Stats.num_forced`)."
    ),
    Status.EVENT: "A terminal event ended the solve (`Solution.event_t`, `event_index`).",
    Status.NONFINITE: (
        "The state or its derivative became non-finite (inf or NaN) and no smaller step "
        "avoided it. Check `func` and `y0` for values that overflow, or use a smaller "
        "`step_size` with a fixed-step method."
    ),
}


def failed(status):
    """A status tensor's failures, elementwise: neither SUCCESS nor EVENT."""
    return (status != int(Status.SUCCESS)) & (status != int(Status.EVENT))


class SolveError(RuntimeError):
    """Raised (eagerly) when a solve fails; graphs raise `tf.errors.InvalidArgumentError`
    with the same message."""


class Stats(NamedTuple):
    """Counts of the forward solve, as int32 scalar tensors (`[batch]` with
    `per_sample=True`: each sample's own counts, as if solved alone).

    Attributes:
        num_steps: accepted steps.
        num_rejected: rejected trial steps.
        num_fevals: evaluations of `func` in the forward solve, including the first-step
            selection.
        num_fevals_backward: evaluations of `func` the gradient will make: with ACA,
            the stages `y1` uses (`tableau.solution_stages`) per accepted step (with
            interpolated outputs, the stages the interpolant uses), plus the
            interpolant's last stage, `f(t1, y1)`, for each step with outputs inside,
            plus, with a checkpoint budget, the solution's stages of each forward step
            the replay rebuilds; known when the forward ends (with an implicit
            solver, one per stage as for the explicit ones: the Newton iterations that
            rebuild each stage and the Jacobians are left out, 2-5 times as many in
            `benchmarks/stiff.md`); with the naive
            method 0 (it differentiates the recorded evaluations); with the adjoint -1,
            as its reverse solve is adaptive: `AdjointGradient.backward_stats` holds it
            once the gradient has been computed.
        num_forced: trials at `min_step` accepted although the error control rejected
            them (`force_min_step=True`): where the solution is less accurate than
            the tolerance asks; counted in `num_steps` too.
    """

    num_steps: Any
    num_rejected: Any
    num_fevals: Any
    num_fevals_backward: Any = 0
    num_forced: Any = 0


class Solution(NamedTuple):
    """The result of `tfaca.solve`.

    Attributes:
        ts: the output times (as a tensor of the solve's dtype).
        ys: the state at each output time, with the structure of `y0` and a leading axis
            of `len(ts)`. Entries after a failure are NaN.
        stats: a `Stats`.
        status: an int32 scalar tensor holding a `Status` value; with
            `per_sample=True`, `[batch]`, each sample's own (a sample can fail while the
            others succeed; `throw=True` reports the first sample that failed).
            `Status.name_of(status)` gives its name(s).
        t_final: the time the solve reached (the last output time on success);
            `[batch]` with `per_sample=True`.
        event_t, event_y, event_index: with an `event`, where it happened: its time, the
            state there (structure of `y0`) and which condition crossed (its position in
            the condition's tuple); per sample (`(batch,)` leading axis) when the
            condition returns one value per sample. A sample without an event reports
            the end of its solve (its last output time and state) and index -1. The
            time and state are differentiable (`tfaca.Event`). None without an event.
    """

    ts: Any
    ys: Any
    stats: Stats
    status: Any
    t_final: Any
    event_t: Any = None
    event_y: Any = None
    event_index: Any = None
