"""Butcher tableaus: the validated data that defines a Runge–Kutta method, explicit or
diagonally implicit.

A tableau is plain Python floats, checked once when it is built, so that a typo in a
coefficient fails at import time instead of silently lowering a solver's order. The
generic step in `_solvers` reads it at trace time and skips zero entries, so the graph
holds only the multiply-adds the method really needs.
"""

import dataclasses
import math

# Consistency conditions hold exactly in rational arithmetic; the published decimal
# expansions (Tsit5) are accurate to ~1e-16, so allow a little more than that.
_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of a Runge–Kutta method, with an optional embedded pair.

    Stage `i` is evaluated at `t0 + c[i] * dt` on
    `z_i = y0 + dt * sum_j a_lower[i - 1][j] * k[j] + dt * a_diagonal[i] * k[i]`
    (`k[i] = f(t0 + c[i] dt, z_i)`: an equation for `z_i` where `a_diagonal[i]` is not 0,
    solved by `_implicit`); the step is
    `y1 = y0 + dt * sum_i b_sol[i] * k[i]` and its local error estimate is
    `y_error = dt * sum_i b_error[i] * k[i]`, where `b_error = b_sol - b_embedded`.

    Args:
        c: nodes, one per stage; `c[0]` must be 0.
        a_lower: the strictly lower-triangular rows of the Runge–Kutta matrix:
            `a_lower[i]` has `i + 1` entries and must sum to `c[i + 1]`.
        b_sol: weights of the solution; they must sum to 1.
        b_error: weights of the error estimate (difference of the two solutions'
            weights); they must sum to 0. `None` for a fixed-step method.
        b_dense: the method's continuous extension (dense output), or `None` for the
            cubic Hermite fallback that every solver gets (`AbstractSolver.dense_weights`):
            one tuple per stage of the coefficients of `theta, theta**2, ...` in the
            weight `b_i(theta)`, so that `y(t0 + theta * dt) = y0 + dt * sum_i
            b_i(theta) * k[i]` for `theta` in [0, 1]. Each `b_i(1)` must equal
            `b_sol[i]` (the extension ends on the step's solution) and the weights must
            sum to `theta` (it is exact for `dy/dt = 1`).
        a_diagonal: the diagonal of the Runge–Kutta matrix, one entry per stage, or
            `None` for an explicit method (all zero). Row `i` of `a_lower` plus
            `a_diagonal[i + 1]` must sum to `c[i + 1]`; `a_diagonal[0]` must be 0 (the
            first stage is `f(t0, y0)`, explicit: an ESDIRK method).

    Raises:
        ValueError: if the shapes or the consistency conditions do not hold.
    """

    c: tuple
    a_lower: tuple
    b_sol: tuple
    b_error: tuple = None
    b_dense: tuple = None
    a_diagonal: tuple = None

    def __post_init__(self):
        object.__setattr__(self, "c", tuple(float(x) for x in self.c))
        object.__setattr__(
            self, "a_lower", tuple(tuple(float(x) for x in row) for row in self.a_lower)
        )
        object.__setattr__(self, "b_sol", tuple(float(x) for x in self.b_sol))
        if self.b_error is not None:
            object.__setattr__(self, "b_error", tuple(float(x) for x in self.b_error))
        if self.b_dense is not None:
            object.__setattr__(
                self, "b_dense", tuple(tuple(float(x) for x in row) for row in self.b_dense)
            )

        stages = len(self.c)
        diagonal = (0.0,) * stages
        if self.a_diagonal is not None:
            object.__setattr__(self, "a_diagonal", tuple(float(x) for x in self.a_diagonal))
            if len(self.a_diagonal) != stages or self.a_diagonal[0] != 0.0:
                raise ValueError(
                    f"`a_diagonal` must have one entry per stage ({stages}), the first 0 "
                    f"(an explicit first stage). Received: a_diagonal={self.a_diagonal}")
            diagonal = self.a_diagonal
        if stages < 1 or self.c[0] != 0.0:
            raise ValueError(f"`c` must be non-empty and start with 0. Received: c={self.c}")
        if len(self.a_lower) != stages - 1:
            raise ValueError(
                f"`a_lower` must have one row per stage after the first ({stages - 1}). "
                f"Received: {len(self.a_lower)} rows."
            )
        for i, row in enumerate(self.a_lower):
            if len(row) != i + 1:
                raise ValueError(
                    f"Row {i} of `a_lower` must have {i + 1} entries. Received: {row}"
                )
            total = math.fsum(row + (diagonal[i + 1],))
            if not math.isclose(total, self.c[i + 1], abs_tol=_TOLERANCE):
                with_diagonal = "" if self.a_diagonal is None else f" (with a_diagonal[{i + 1}])"
                raise ValueError(
                    f"Row {i} of `a_lower`{with_diagonal} must sum to "
                    f"c[{i + 1}]={self.c[i + 1]}. Received: sum={total}"
                )
        if len(self.b_sol) != stages:
            raise ValueError(
                f"`b_sol` must have {stages} entries. Received: b_sol={self.b_sol}"
            )
        if not math.isclose(math.fsum(self.b_sol), 1.0, abs_tol=_TOLERANCE):
            raise ValueError(
                f"`b_sol` must sum to 1. Received: sum={math.fsum(self.b_sol)}"
            )
        if self.b_error is not None:
            if len(self.b_error) != stages:
                raise ValueError(
                    f"`b_error` must have {stages} entries. Received: b_error={self.b_error}"
                )
            if not math.isclose(math.fsum(self.b_error), 0.0, abs_tol=_TOLERANCE):
                raise ValueError(
                    "`b_error` (b_sol - b_embedded) must sum to 0. "
                    f"Received: sum={math.fsum(self.b_error)}"
                )

        if self.b_dense is not None:
            self._check_dense()

    def _check_dense(self):
        rows = self.b_dense
        if len(rows) != self.stages or len({len(row) for row in rows}) != 1 or not rows[0]:
            raise ValueError(
                f"`b_dense` must have one non-empty row of polynomial coefficients per stage "
                f"({self.stages}), all of one length. Received: b_dense={rows}"
            )
        for i, (row, b) in enumerate(zip(rows, self.b_sol)):
            if not math.isclose(math.fsum(row), b, abs_tol=_TOLERANCE):
                raise ValueError(
                    f"`b_dense[{i}]` must equal b_sol[{i}]={b} at theta=1. "
                    f"Received: {math.fsum(row)}"
                )
        for power, column in enumerate(zip(*rows), start=1):
            if not math.isclose(math.fsum(column), float(power == 1), abs_tol=_TOLERANCE):
                raise ValueError(
                    f"The weights `b_dense` must sum to theta: the coefficients of "
                    f"theta**{power} must sum to {int(power == 1)}. Received: {math.fsum(column)}"
                )

    @property
    def stages(self):
        return len(self.c)

    @property
    def solution_stages(self):
        """Stages that `y1` needs: up to the last non-zero weight of `b_sol` (FSAL
        tableaus end with a stage that only the next step and the error estimate use)."""
        return 1 + max(i for i, b in enumerate(self.b_sol) if b != 0.0)

    @property
    def implicit(self):
        """Whether some stage is an equation in itself (a non-zero `a_diagonal` entry)."""
        return self.a_diagonal is not None and any(x != 0.0 for x in self.a_diagonal)

    @property
    def fsal(self):
        """First Same As Last: the last stage is f(t1, y1), so the next step reuses it."""
        return (
            not self.implicit
            and self.stages > 1
            and self.c[-1] == 1.0
            and self.a_lower[-1] == self.b_sol[:-1]
            and self.b_sol[-1] == 0.0
        )
