"""Step-size control: the error norm, the step-size update, and the first step.

These follow Hairer, Nørsett & Wanner, "Solving Ordinary Differential Equations I",
II.4, as scipy's `solve_ivp`, torchdiffeq and the ACA reference code (TorchDiffEqPack) do,
so that tfaca takes the same steps as those libraries at the same tolerances (with the
same error estimate: `Dopri5`'s is TorchDiffEqPack's and scipy's by default,
torchdiffeq's and diffrax's with `error_estimate="shampine"`):

- one step size for the whole state (a batch shares it): the error is the RMS over every
  element of every state component; or, with `per_sample`, one step size per sample of a
  batch (the leading axis of every component): the RMS over each sample's elements, so
  that a sample's steps do not depend on the others;
- an integral (I) controller, `dt * clip(safety * err^(-1/(q+1)), factor_min,
  factor_max)` with `q` the order of the error estimate, the factor at least 1 after an
  accepted step (as TorchDiffEqPack, torchdiffeq and diffrax; Hairer's DOPRI5 and scipy
  let an accepted step with an error ratio near 1 shrink the next). A PID controller
  (`PIDController`: the last two accepted steps' errors too) damps oscillating step sizes
  on mildly stiff problems, with fewer rejected trials but more accepted steps, which ACA
  pays twice (`benchmarks/step_control.md`); the paper's results and its peers' defaults
  use the I controller, which stays the default.
"""

import dataclasses
import math
import numbers

import tensorflow as tf

from tfaca._solvers import per_row


class PIDController:
    """The PID step-size controller's coefficients (Söderlind, "Digital filters in adaptive
    time-stepping", ACM TOMS 2003; diffrax's `PIDController`): after a trial with error
    ratio `err_n`, the next step is `dt * safety * err_n^(-b1) err_{n-1}^(-b2)
    err_{n-2}^(-b3)` with `b1 = (pcoeff + icoeff + dcoeff) / k`, `b2 = -(pcoeff + 2 dcoeff)
    / k`, `b3 = dcoeff / k`, `k` the error estimate's order plus one, and `err_{n-1}`,
    `err_{n-2}` the ratios of the last two accepted steps (1 before there are any).
    `(0, 1, 0)` is the integral controller, tfaca's default, and takes exactly its steps.
    Rejections, `factor_min`, `factor_max` and `safety` work as with the integral
    controller.

    Args:
        pcoeff, icoeff, dcoeff: the proportional, integral and derivative coefficients:
            finite numbers, `icoeff > 0`. Söderlind's PI controllers, e.g. `(0.4, 0.3, 0)`
            (diffrax's suggestion) or `(0.2, 0.4, 0)`, damp the oscillating step sizes
            of mildly stiff problems, with fewer rejected trials.
    """

    def __init__(self, pcoeff=0.0, icoeff=1.0, dcoeff=0.0):
        for name, value in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)):
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number. Received: {name}={value!r}")
        if not icoeff > 0:
            raise ValueError(f"`icoeff` must be > 0. Received: icoeff={icoeff!r}")
        self.pcoeff, self.icoeff, self.dcoeff = float(pcoeff), float(icoeff), float(dcoeff)

    def config(self):
        return {"pcoeff": self.pcoeff, "icoeff": self.icoeff, "dcoeff": self.dcoeff}

    def __eq__(self, other):
        return isinstance(other, PIDController) and self.config() == other.config()

    def __hash__(self):
        return hash(tuple(self.config().items()))

    def __repr__(self):
        return f"PIDController(pcoeff={self.pcoeff}, icoeff={self.icoeff}, dcoeff={self.dcoeff})"


@dataclasses.dataclass(frozen=True)
class StepSizeController:
    """Integral step-size controller with the Hairer–Nørsett–Wanner defaults.

    Args:
        rtol: relative tolerance: a flat list of tensors, one per state component,
            each broadcastable to its component.
        atol: absolute tolerance, in the same form as `rtol`.
        safety: the factor (< 1) applied to the optimal step so that the next trial is
            likely to be accepted. 0.9 as scipy, torchdiffeq and TorchDiffEqPack.
        factor_min: the largest shrink per step (0.2, as those libraries).
        factor_max: the largest growth per step (10, as those libraries).
        max_step: an upper bound on `|dt|`, or `None`.
        min_step: a lower bound on `|dt|` (a step that lands on a stop may be shorter),
            or `None`. A trial of at most `min_step` that the error control rejects
            ends the solve with `Status.DT_UNDERFLOW`, or, with `force_min_step`, is
            accepted (`Stats.num_forced`) unless it is not finite.
        force_min_step: see `min_step`.
        measured: the error norm's components: `None`, all of them; an int `m`, the
            first `m` (the adjoint's seminorm leaves the parameters' adjoint out).
        per_sample: whether the leading axis of every component is a batch of samples
            with a step size each: error ratios and first steps are then `[batch]`.
    """

    rtol: list
    atol: list
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    max_step: float = None
    min_step: float = None
    force_min_step: bool = False
    measured: int = None
    per_sample: bool = False
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0

    @property
    def remembers(self):
        """Whether the update reads the last accepted steps' error ratios (a PID
        controller with `pcoeff` or `dcoeff`)."""
        return self.pcoeff != 0 or self.dcoeff != 0

    def history(self, like):
        """The error ratios of the last two accepted steps before any (`[2, G]`, ones), or
        () for the integral controller."""
        return tf.ones(tf.concat([[2], tf.shape(like)], 0), like.dtype) if self.remembers else ()

    def remember(self, history, err, accept):
        """`history` after a trial with error ratio `err`, kept where `accept`."""
        if not self.remembers:
            return ()
        # Floored: a zero error would make a later factor 0 (or infinite).
        err = tf.maximum(err, tf.cast(1e-10, err.dtype))
        return tf.where(accept[None], tf.stack([err, history[0]]), history)

    def _scaled_rms(self, values, scale_from):
        """RMS over all elements of `values[n] / (atol + rtol * scale_from[n])` (per sample:
        over each sample's elements, `[batch]`)."""
        total = 0.0
        count = 0
        for v, s, rtol, atol in zip(values[:self.measured], scale_from, self.rtol, self.atol):
            ratio = tf.square(v / (atol + rtol * s))
            if self.per_sample:
                axes = list(range(1, ratio.shape.rank))
                total += tf.reduce_sum(ratio, axis=axes) if axes else ratio
                count += tf.reduce_prod(tf.shape(ratio)[1:])
            else:
                total += tf.reduce_sum(ratio)
                count += tf.size(ratio)
        # An empty state (a replica's empty batch under tf.distribute) has no error.
        return tf.sqrt(total / tf.cast(tf.maximum(count, 1), total.dtype))

    def error_ratio(self, y0, y1, y_error):
        """Scaled RMS of the local error; the step is accepted when it is <= 1."""
        scale = [tf.maximum(tf.abs(a), tf.abs(b)) for a, b in zip(y0, y1)]
        return self._scaled_rms(y_error, scale)

    def next_step(self, dt, err, error_order, history=()):
        """The step size to try next after a trial with error ratio `err` (and, for a PID
        controller, `history`: the last two accepted steps' ratios, `remember`).

        A non-finite `err` (the trial produced inf or NaN) shrinks the step by
        `factor_min`, so the solver backs away from the blow-up; if it cannot, the step
        size underflows and the loop reports it.
        """
        k = error_order + 1
        exponent = -(self.pcoeff + self.icoeff + self.dcoeff) / k
        safe_err = tf.where(err > 0, err, tf.ones_like(err))
        factor = self.safety * safe_err**exponent
        if self.remembers:
            factor *= history[0] ** ((self.pcoeff + 2 * self.dcoeff) / k)
            factor *= history[1] ** (-self.dcoeff / k)
        factor = tf.where(err > 0, factor, self.factor_max * tf.ones_like(err))
        factor = tf.clip_by_value(factor, self.factor_min, self.factor_max)
        # An accepted step never shrinks the next (TorchDiffEqPack, torchdiffeq, diffrax).
        factor = tf.where(err <= 1.0, tf.maximum(factor, 1.0), factor)
        factor = tf.where(tf.math.is_finite(err), factor, self.factor_min * tf.ones_like(err))
        return self.clip(dt * factor)

    def clip(self, dt):
        """`dt` within `[min_step, max_step]` in size."""
        size = tf.abs(dt)
        if self.max_step is not None:
            size = tf.minimum(size, self.max_step)
        if self.min_step is not None:
            size = tf.maximum(size, self.min_step)
        return tf.sign(dt) * size

    def at_floor(self, dt):
        """`[G]` bool: the trials no shorter step may follow (at most `min_step`); None
        without a `min_step`."""
        if self.min_step is None:
            return None
        return tf.abs(dt) <= self.min_step

    def first_step(self, func, t0, y0, f0, error_order, direction):
        """Automatic first step (Hairer–Nørsett–Wanner I, II.4; scipy's `select_initial_step`).

        Costs one evaluation of `func`. Returns a signed step.
        """
        scale = [tf.abs(y) for y in y0]
        d0 = self._scaled_rms(y0, scale)
        d1 = self._scaled_rms(f0, scale)
        small = tf.cast(1e-5, d0.dtype)
        h0 = tf.where(
            (d0 < small) | (d1 < small),
            tf.cast(1e-6, d0.dtype),
            0.01 * d0 / tf.where(d1 > 0, d1, tf.ones_like(d1)),
        )
        y1 = [y + per_row(direction * h0, f) * f for y, f in zip(y0, f0)]
        f1 = func(t0 + direction * h0, y1)
        d2 = self._scaled_rms([a - b for a, b in zip(f1, f0)], scale) / h0
        d12 = tf.maximum(d1, d2)
        h1 = tf.where(
            d12 <= 1e-15,
            tf.maximum(tf.cast(1e-6, d0.dtype), h0 * 1e-3),
            (0.01 / tf.where(d12 > 0, d12, tf.ones_like(d12))) ** (1.0 / (error_order + 1)),
        )
        return self.clip(direction * tf.minimum(100.0 * h0, h1))
