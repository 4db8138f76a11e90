"""Stiff problems: tfaca's ESDIRK solvers (Kvaerno5, Kvaerno3) against diffrax and SciPy.

    python benchmarks/stiff.py [--quick] [--problems robertson,vdp,...]
                               [--out benchmarks/stiff.md] [--json PATH]

Every problem in float64, every solver at the same rtol/atol, against a SciPy Radau solve
at rtol 1e-10 landing on each output time (`reference`):

- Robertson's chemical kinetics (k1, k2, k3 = 0.04, 1e4, 3e7; y0 = (1, 0, 0)), outputs
  from t = 0.4 to 1e5, rtol 1e-6, atol 1e-10, and again at rtol 1e-8, atol 1e-12 (the
  Kvaerno5 and SciPy entries only);
- Van der Pol with mu = 1,000 (y0 = (2, 0)), outputs every 500 on [0, 3000] (the
  fast transitions near t = 807, 1614, 2421), rtol 1e-6, atol 1e-9, and again at rtol
  1e-8, atol 1e-11 (where the gradients converge; at 1e-6 neither library's is near the
  finite differences);
- a batch of 16 Robertson systems, each with its own rate constants (one step size for
  the batch): tfaca with one 3x3 Jacobian block per sample (`jacobian="batch"`) and
  with the whole 48x48 one (`"full"`); diffrax and SciPy take the whole one.

Forward: tfaca Kvaerno5 (also stepping onto the output times, `interpolate=False`) and
Kvaerno3 in a plain `tf.function` (the solve's default `jit_compile="auto"`, which
compiles its loops with XLA), diffrax Kvaerno5 with `PIDController(rtol, atol, pcoeff=0,
icoeff=1)` under `jax.jit`, SciPy's Radau and BDF (`solve_ivp`, given the analytic
Jacobian), and tfaca's explicit Dopri5 (`throw=False`: where it stops and why).

Forward+backward: the gradient of loss = sum over the outputs after t0 of |w * y|^2 / 2
with respect to y0 and the parameters (the rate constants, mu): tfaca Kvaerno5 with ACA
(its replay differentiates the implicit stages by the implicit function theorem) in a
plain `tf.function`, diffrax Kvaerno5 with `jax.jit(jax.value_and_grad(...))` (its default
`RecursiveCheckpointAdjoint`), checked against each other and against central finite
differences of the reference solve.

The full run takes about 9 minutes on 2 cores. `--quick`: Robertson only, outputs to
t = 40, 3 repetitions, no Kvaerno3 nor `interpolate=False` entries, evaluation counts
from the libraries' statistics only (no counting copies); about 30-60 s, most of it
compiling. `--json PATH` saves the results, `--render-only PATH` re-writes the report
from them.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from run import _cpu, write_report  # noqa: E402
from runners import _median_time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Central differences: a step of FD_STEP times the entry, or FD_STEP * FD_ZERO_SCALE where
# the entry is 0 (Robertson's y2(0): a step of -1e-4 there makes y2 < 0 and the solve blow
# up; at 1e-6 the differences agree with those at 1e-7 to ~1e-7).
FD_STEP = 1e-4
FD_ZERO_SCALE = 1e-2


# ----------------------------------------------------------------------------- problems
# One formula per field for NumPy, TensorFlow and JAX: `stack` is np.stack, tf.stack or
# jnp.stack; the state's last axis holds the components, leading axes are a batch.

def robertson(stack, y, k):
    slow = k[..., 0] * y[..., 0]
    back = k[..., 1] * y[..., 1] * y[..., 2]
    fast = k[..., 2] * y[..., 1] * y[..., 1]
    return stack([back - slow, slow - back - fast, fast], axis=-1)


def robertson_jacobian(y, k):
    """d robertson / dy for one system (NumPy, `y` and `k` of shape (3,))."""
    y1, y2, y3 = y
    k1, k2, k3 = k
    return np.array([[-k1, k2 * y3, k2 * y2],
                     [k1, -k2 * y3 - 2 * k3 * y2, -k2 * y2],
                     [0.0, 2 * k3 * y2, 0.0]])


def van_der_pol(stack, y, mu):
    x, v = y[..., 0], y[..., 1]
    return stack([v, mu * (1 - x * x) * v - x], axis=-1)


def van_der_pol_jacobian(y, mu):
    x, v = y
    return np.array([[0.0, 1.0], [-2 * mu * x * v - 1, mu * (1 - x * x)]])


class Problem:
    """A stiff test problem: the field, its parameters, output times and tolerances, and
    the loss whose gradient is measured, `sum over outputs of |weights * y|^2 / 2`."""

    def __init__(self, name, title, field, jacobian, y0, params, ts, rtol, atol, ref_atol,
                 weights, max_steps, note, light=False):
        self.name, self.title, self.field, self.jacobian = name, title, field, jacobian
        self.y0, self.params, self.ts = np.asarray(y0, float), np.asarray(params, float), ts
        self.rtol, self.atol, self.ref_atol = rtol, atol, ref_atol
        self.weights, self.max_steps, self.note = np.asarray(weights, float), max_steps, note
        self.batch = self.y0.ndim == 2
        self.light = light  # the Kvaerno5 and SciPy entries only (a second tolerance)

    def at_tolerance(self, name, rtol, atol):
        """The same problem at other tolerances, with the Kvaerno5 and SciPy entries."""
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.name, other.rtol, other.atol, other.light = name, rtol, atol, True
        other.title = f"{self.title} at rtol {rtol:g}"
        return other

    def key(self):
        """What the reference and finite differences depend on."""
        return (self.field.__name__, self.y0.tobytes(), self.params.tobytes(),
                self.ts.tobytes(), self.weights.tobytes(), self.ref_atol)

    # SciPy works on the flattened state.
    def scipy_fun(self, params):
        shape = self.y0.shape
        return lambda t, y: self.field(np.stack, y.reshape(shape), params).ravel()

    def scipy_jac(self, params):
        if not self.batch:
            return lambda t, y: self.jacobian(y, params)
        shape = self.y0.shape
        return lambda t, y: scipy.linalg.block_diag(
            *[self.jacobian(yb, pb) for yb, pb in zip(y.reshape(shape), params)])

    def loss(self, ys):
        """The loss of the outputs after the start (y(t0) = y0 is left out)."""
        return 0.5 * float(np.sum((self.weights * ys[1:]) ** 2))


def make_problems(quick):
    rob_ts = np.array([0.0, 0.4, 4.0, 40.0] + ([] if quick else [400.0, 4e3, 4e4, 1e5]))
    rng = np.random.default_rng(0)
    batch = 16
    k_batch = np.array([0.04, 1e4, 3e7]) * np.exp(rng.uniform(-1.0, 1.0, size=(batch, 3)))
    y0_batch = np.tile([1.0, 0.0, 0.0], (batch, 1))
    problems = {
        "robertson": Problem(
            "robertson", "Robertson's chemical kinetics", robertson, robertson_jacobian,
            [1.0, 0.0, 0.0], [0.04, 1e4, 3e7], rob_ts, 1e-6, 1e-10, 1e-16,
            [1.0, 1e4, 1.0], 4096,
            "y1' = -k1 y1 + k2 y2 y3, y2' = k1 y1 - k2 y2 y3 - k3 y2^2, y3' = k3 y2^2; "
            "(k1, k2, k3) = (0.04, 1e4, 3e7), y0 = (1, 0, 0); loss weights (1, 1e4, 1) "
            "(y2 is ~1e-5)"),
        "vdp": Problem(
            "vdp", "Van der Pol, mu = 1,000", van_der_pol, van_der_pol_jacobian,
            [2.0, 0.0], 1000.0, np.linspace(0.0, 3000.0, 7), 1e-6, 1e-9, 1e-13,
            [1.0, 1e3], 16384,
            "x' = v, v' = mu (1 - x^2) v - x, mu = 1,000, y0 = (2, 0), t in [0, 3000] "
            "(relaxation transitions near t = 807, 1614, 2421); loss weights (1, 1e3) "
            "(v is ~1e-3 between the transitions)"),
        "robertson_batch": Problem(
            "robertson_batch", "Robertson, a batch of 16 systems", robertson,
            robertson_jacobian, y0_batch, k_batch, rob_ts, 1e-6, 1e-10, 1e-16,
            [1.0, 1e4, 1.0], 4096,
            "16 Robertson systems, state [16, 3], each rate constant of each system the "
            "standard one times exp(U(-1, 1)) (seed 0); one step size for the batch (the "
            "error norm's RMS is over the whole batch)"),
    }
    problems["robertson_tight"] = problems["robertson"].at_tolerance(
        "robertson_tight", 1e-8, 1e-12)
    problems["vdp_tight"] = problems["vdp"].at_tolerance("vdp_tight", 1e-8, 1e-11)
    problems["vdp_tight"].max_steps = 65536
    return problems


# ----------------------------------------------------------------------------- reference

def reference(problem, params=None, y0=None, rtol=1e-10):
    """Radau at `rtol` (the problem's tight atol, analytic Jacobian), restarted at each
    output time so that every output is a step's end, not an interpolant."""
    params = problem.params if params is None else params
    y = (problem.y0 if y0 is None else y0).ravel()
    fun, jac = problem.scipy_fun(params), problem.scipy_jac(params)
    out = [y]
    for a, b in zip(problem.ts[:-1], problem.ts[1:]):
        sol = solve_ivp(fun, (a, b), out[-1], method="Radau", rtol=rtol, atol=problem.ref_atol,
                        jac=jac)
        if sol.status != 0:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        out.append(sol.y[:, -1])
    return np.stack(out).reshape((len(problem.ts),) + problem.y0.shape)


def finite_differences(problem, directions=None):
    """Central differences of the reference solve's loss with respect to (y0, params),
    flattened in that order: `(gradient, None)`; or along `directions` (rows, each
    scaled entry by entry as the steps are): `(directional derivatives, the scaled
    directions)`."""
    theta = np.concatenate([problem.y0.ravel(), problem.params.ravel()])
    n0 = problem.y0.size
    scale = np.where(theta != 0, np.abs(theta), FD_ZERO_SCALE)

    def loss(th):
        y0 = th[:n0].reshape(problem.y0.shape)
        params = th[n0:].reshape(problem.params.shape)
        return problem.loss(reference(problem, params, y0))

    per_entry = directions is None
    scaled = (np.eye(theta.size) if per_entry else directions) * scale
    out = np.array([(loss(theta + FD_STEP * d) - loss(theta - FD_STEP * d)) / (2 * FD_STEP)
                    for d in scaled])
    return (out / scale, None) if per_entry else (out, scaled)


def errors(problem, ys, ref):
    """(relative, in tolerance units): max over outputs (and samples) of
    |y - ref|_inf / |ref|_inf, and max over every entry of |y - ref| / (atol + rtol |ref|)."""
    diff = np.abs(ys - ref)[1:]
    refa = np.abs(ref)[1:]
    rel = float(np.max(np.max(diff, axis=-1) / np.max(refa, axis=-1)))
    tol = float(np.max(diff / (problem.atol + problem.rtol * refa)))
    return rel, tol


def relative_difference(a, b):
    """max over entries of |a - b| / |b|."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _time(fn, reps):
    """(first call's seconds, median of `reps` later calls): the first traces and
    compiles."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    if first > 20:  # a slow call: fewer repetitions
        reps = min(reps, 3)
    return out, first, _median_time(fn, reps)


# ----------------------------------------------------------------------------- SciPy

def scipy_entry(problem, method, reps):
    fun, jac = problem.scipy_fun(problem.params), problem.scipy_jac(problem.params)
    ts = problem.ts

    def run():
        return solve_ivp(fun, (ts[0], ts[-1]), problem.y0.ravel(), method=method,
                         rtol=problem.rtol, atol=problem.atol, jac=jac, dense_output=True)

    sol, _, seconds = _time(run, reps)
    ys = sol.sol(ts).T.reshape((len(ts),) + problem.y0.shape)
    return dict(ys=ys, steps=len(sol.t) - 1, rejected=None, fevals=sol.nfev,
                jacobians=sol.njev, lu=sol.nlu, fwd_ms=1e3 * seconds, compile_s=None,
                status="SUCCESS" if sol.status == 0 else sol.message)


# ----------------------------------------------------------------------------- tfaca

def _tfaca_solver(tfaca, method, jacobian):
    return {"kvaerno5": lambda: tfaca.Kvaerno5(jacobian=jacobian),
            "kvaerno3": lambda: tfaca.Kvaerno3(jacobian=jacobian),
            "dopri5": lambda: "dopri5"}[method]()


def tfaca_entry(problem, method, reps, *, interpolate=True, jacobian="auto", gradient=False,
                count=False, max_steps=None):
    """tfaca.solve in a plain tf.function (jit_compile="auto": its loops under XLA).
    Forward, or with `gradient` forward+backward (ACA); `count`: the evaluations counted
    by a variable in the field, in a copy with the loops uncompiled (the same steps)."""
    import tensorflow as tf

    import tfaca

    y0 = tf.constant(problem.y0)
    params = tf.constant(problem.params)
    ts = tf.constant(problem.ts)
    weights = tf.constant(problem.weights)
    explicit = method == "dopri5"
    kw = dict(method=_tfaca_solver(tfaca, method, jacobian), rtol=problem.rtol,
              atol=problem.atol, max_steps=max_steps or problem.max_steps,
              interpolate=interpolate, throw=not explicit)
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    def field(t, y, p):
        return problem.field(tf.stack, y, p)

    def counted(t, y, p):
        counter.assign_add(1)
        return problem.field(tf.stack, y, p)

    def build(func, jit_compile):
        def solve(y0, p):
            return tfaca.solve(func, y0, ts, args=(p,), jit_compile=jit_compile, **kw)

        @tf.function
        def fwd(y0, p):
            sol = solve(y0, p)
            return sol.ys, sol.stats, sol.status, sol.t_final

        @tf.function
        def fwdbwd(y0, p):
            with tf.GradientTape() as tape:
                tape.watch([y0, p])
                sol = solve(y0, p)
                loss = 0.5 * tf.reduce_sum((weights * sol.ys[1:]) ** 2)
            return sol.ys, loss, tape.gradient(loss, [y0, p]), sol.stats

        return fwd, fwdbwd

    fwd, fwdbwd = build(field, "auto")
    if not gradient:
        (ys, stats, status, t_final), first, seconds = _time(lambda: fwd(y0, params), reps)
        out = dict(ys=ys.numpy(), fwd_ms=1e3 * seconds, compile_s=first - seconds,
                   status=str(tfaca.Status(int(status))), t_final=float(t_final))
    else:
        (ys, loss, grads, stats), first, seconds = _time(
            lambda: [x for x in fwdbwd(y0, params)], reps)
        out = dict(ys=ys.numpy(), loss=float(loss), fwdbwd_ms=1e3 * seconds,
                   compile_s=first - seconds, status="SUCCESS",
                   grad=np.concatenate([g.numpy().ravel() for g in grads]),
                   fevals_bwd_stat=int(stats.num_fevals_backward))
    steps, rejected = int(stats.num_steps), int(stats.num_rejected)
    out.update(steps=steps, rejected=rejected, fevals=int(stats.num_fevals),
               jacobians=0 if explicit else steps + rejected)
    if count:
        # The loops uncompiled: the same trials, and a far shorter compile.
        c_fwd, c_fwdbwd = build(counted, False)
        counter.assign(0)
        c_stats = (c_fwdbwd(y0, params)[3] if gradient else c_fwd(y0, params)[1])
        out["counted"] = int(counter.numpy())
        out["counted_steps"] = (int(c_stats.num_steps), int(c_stats.num_rejected))
        out["counted_stats_fevals"] = int(c_stats.num_fevals)
    return out


# ----------------------------------------------------------------------------- diffrax

def diffrax_available():
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("jax", "diffrax"))


def diffrax_entry(problem, reps, *, gradient=False, count=False):
    """diffrax.diffeqsolve, Kvaerno5 + PIDController(rtol, atol, pcoeff=0, icoeff=1)
    (the integral controller, as tfaca's), SaveAt(ts=...) (its interpolant), under
    jax.jit; `gradient`: jax.value_and_grad, the default RecursiveCheckpointAdjoint.
    `count`: vector field calls by a jax.debug.callback in a separately compiled copy; in
    the forward one, the Jacobians apart (a custom_jvp whose rule counts them)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp

    ts = jnp.asarray(problem.ts)
    weights = jnp.asarray(problem.weights)
    tally = {"f": 0, "jvp": 0}

    def field(t, y, p):
        return problem.field(jnp.stack, y, p)

    def tick(key):
        def inc():
            tally[key] += 1
        return inc

    def plain_counted(t, y, p):
        jax.debug.callback(tick("f"))
        return field(t, y, p)

    @jax.custom_jvp
    def split_counted(t, y, p):
        jax.debug.callback(tick("f"))
        return field(t, y, p)

    @split_counted.defjvp
    def _split_counted_jvp(primals, tangents):
        jax.debug.callback(tick("jvp"))
        return jax.jvp(field, primals, tangents)

    def solve(y0, p, f=field):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f), diffrax.Kvaerno5(), ts[0], ts[-1], None, y0, args=p,
            stepsize_controller=diffrax.PIDController(rtol=problem.rtol, atol=problem.atol,
                                                      pcoeff=0.0, icoeff=1.0),
            saveat=diffrax.SaveAt(ts=ts), max_steps=problem.max_steps)
        return sol.ys, sol.stats

    def loss(y0, p, f=field):
        ys, stats = solve(y0, p, f)
        return 0.5 * jnp.sum((weights * ys[1:]) ** 2), (ys, stats)

    y0, params = jnp.asarray(problem.y0), jnp.asarray(problem.params)
    if not gradient:
        fwd = jax.jit(solve)
        (ys, stats), first, seconds = _time(
            lambda: jax.block_until_ready(fwd(y0, params)), reps)
        out = dict(ys=np.asarray(ys), fwd_ms=1e3 * seconds, compile_s=first - seconds,
                   status="SUCCESS")
    else:
        fwdbwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        ((value, (ys, stats)), grads), first, seconds = _time(
            lambda: jax.block_until_ready(fwdbwd(y0, params)), reps)
        out = dict(ys=np.asarray(ys), loss=float(value), fwdbwd_ms=1e3 * seconds,
                   compile_s=first - seconds, status="SUCCESS",
                   grad=np.concatenate([np.asarray(g).ravel() for g in grads]))
    out.update(steps=int(stats["num_accepted_steps"]),
               rejected=int(stats["num_rejected_steps"]))
    if count:
        if gradient:
            counting = jax.jit(jax.grad(lambda a, b: loss(a, b, plain_counted)[0],
                                        argnums=(0, 1)))
        else:
            counting = jax.jit(lambda a, b: solve(a, b, split_counted))
        jax.block_until_ready(counting(y0, params))
        jax.effects_barrier()
        out["counted"] = tally["f"] + tally["jvp"]
        if not gradient:
            out["fevals"], out["jacobians"] = tally["f"], tally["jvp"]
    return out


# ----------------------------------------------------------------------------- one problem

def _fail(exc):
    return dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def benchmark(problem, quick, reps, cache):
    key = problem.key()
    if key not in cache:
        cache[key] = dict(ref=reference(problem))
    ref = cache[key]["ref"]
    print(f"[{problem.name}] reference done", flush=True)
    forward, gradients = {}, {}
    count = not quick
    dopri_steps = 10000 if quick else 100000

    def run(table, key, fn):
        try:
            r = fn()
        except Exception as exc:  # a failed entry is a row, not the end of the report
            r = _fail(exc)
        if "ys" in r:
            ys = r.pop("ys")
            r["rel_err"], r["tol_err"] = (errors(problem, ys, ref) if r["status"] == "SUCCESS"
                                          else (None, None))
        table[key] = r
        shown = {k: v for k, v in r.items() if k != "grad"}
        print(f"[{problem.name}] {key}: {shown}", flush=True)

    jac = "batch" if problem.batch else "auto"
    run(forward, "tfaca-kvaerno5", lambda: tfaca_entry(problem, "kvaerno5", reps,
                                                      jacobian=jac, count=count))
    if problem.batch:
        run(forward, "tfaca-kvaerno5-full", lambda: tfaca_entry(
            problem, "kvaerno5", reps, jacobian="full", count=count))
    if not quick:
        run(forward, "tfaca-kvaerno5-onto", lambda: tfaca_entry(
            problem, "kvaerno5", reps, jacobian=jac, interpolate=False))
    if not quick and not problem.light:
        run(forward, "tfaca-kvaerno3", lambda: tfaca_entry(problem, "kvaerno3", reps,
                                                          jacobian=jac, count=count))
    if diffrax_available():
        run(forward, "diffrax-kvaerno5", lambda: diffrax_entry(problem, reps, count=count))
    for method in ("Radau", "BDF"):
        run(forward, f"scipy-{method.lower()}", lambda m=method: scipy_entry(problem, m, reps))
    if not problem.light:
        run(forward, "tfaca-dopri5", lambda: tfaca_entry(problem, "dopri5", min(reps, 3),
                                                        max_steps=dopri_steps))

    run(gradients, "tfaca-kvaerno5", lambda: tfaca_entry(
        problem, "kvaerno5", reps, jacobian=jac, gradient=True, count=count))
    if not quick and not problem.batch:
        run(gradients, "tfaca-kvaerno5-onto", lambda: tfaca_entry(
            problem, "kvaerno5", reps, jacobian=jac, interpolate=False, gradient=True))
    if problem.batch and not quick:
        run(gradients, "tfaca-kvaerno5-full", lambda: tfaca_entry(
            problem, "kvaerno5", reps, jacobian="full", gradient=True))
    if diffrax_available():
        run(gradients, "diffrax-kvaerno5", lambda: diffrax_entry(problem, reps, gradient=True,
                                                                count=count))

    # Finite differences: per entry; for the batch along 4 random directions.
    directions = None
    if problem.batch:
        rng = np.random.default_rng(1)
        directions = rng.choice([-1.0, 1.0], size=(4, problem.y0.size + problem.params.size))
    fd_shared = "fd" in cache[key]
    if not fd_shared:
        t0 = time.perf_counter()
        cache[key]["fd"] = finite_differences(problem, directions), time.perf_counter() - t0
    (fd, scaled_directions), fd_s = cache[key]["fd"]
    print(f"[{problem.name}] finite differences: {fd} ({fd_s:.0f} s)", flush=True)

    def project(g):
        return g if scaled_directions is None else scaled_directions @ g

    peer = gradients.get("diffrax-kvaerno5", {}).get("grad")
    for key, r in gradients.items():
        if "grad" not in r:
            continue
        r["vs_fd"] = relative_difference(project(r["grad"]), fd)
        other = (peer if key.startswith("tfaca") else
                 gradients.get("tfaca-kvaerno5", {}).get("grad"))
        if other is not None:
            r["vs_other"] = relative_difference(r["grad"], other)
    return dict(forward=forward, gradients=gradients, fd_seconds=fd_s, fd_shared=fd_shared,
                fd_count=len(fd), fd_directional=directions is not None)


# ----------------------------------------------------------------------------- report

LABELS = {
    "tfaca-kvaerno5": "tfaca Kvaerno5",
    "tfaca-kvaerno5-full": "tfaca Kvaerno5, jacobian=\"full\"",
    "tfaca-kvaerno5-onto": "tfaca Kvaerno5, interpolate=False",
    "tfaca-kvaerno3": "tfaca Kvaerno3",
    "diffrax-kvaerno5": "diffrax Kvaerno5",
    "scipy-radau": "SciPy Radau",
    "scipy-bdf": "SciPy BDF",
    "tfaca-dopri5": "tfaca Dopri5",
}


def _n(x):
    return "n/a" if x is None else f"{x:,}"


def _ms(x):
    return "n/a" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _s(x):
    return "-" if x is None else f"{x:.1f}"


def _e(x):
    return "n/a" if x is None else f"{x:.1e}"


def _g(x):
    return "n/a" if x is None else f"{x:.3g}"


def _label(problem, key):
    label = LABELS[key]
    if problem.batch and key in ("tfaca-kvaerno5", "tfaca-kvaerno5-onto", "tfaca-kvaerno3"):
        label += ", jacobian=\"batch\""
    return label


def _fevals(r):
    """Evaluations outside Jacobians, and Jacobians: tfaca's from its statistics (its
    Jacobians: one per trial); with a counting copy, a check that they add up."""
    f, j = r.get("fevals"), r.get("jacobians")
    if "lu" in r:
        return _n(f), f"{_n(j)} ({r['lu']:,} LU)"
    return _n(f), _n(j)


def forward_table(problem, rows):
    lines = ["| solver | accepted | rejected | f evaluations | Jacobians | rel. error | "
             "error / tol | ms (forward) | compile s | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"| {_label(problem, key)} | {r['error']} |||||||||")
            continue
        f, j = _fevals(r)
        status = r["status"]
        if status != "SUCCESS" and "t_final" in r:
            status += f" at t = {r['t_final']:.4g}"
        lines.append(f"| {_label(problem, key)} | {_n(r['steps'])} | {_n(r['rejected'])} | "
                     f"{f} | {j} | {_e(r['rel_err'])} | {_g(r['tol_err'])} | "
                     f"{_ms(r['fwd_ms'])} | {_s(r['compile_s'])} | {status} |")
    return lines


def gradient_table(problem, rows, ratio):
    lines = ["| solver, gradient | accepted | rejected | f calls (fwd+bwd) | rel. error | "
             "ms (fwd+bwd) | compile s | gradient vs FD | vs the other library | "
             "time / diffrax |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        label = _label(problem, key) + (", ACA" if key.startswith("tfaca") else
                                        ", RecursiveCheckpointAdjoint")
        if "error" in r:
            lines.append(f"| {label} | {r['error']} |||||||||")
            continue
        lines.append(f"| {label} | {_n(r['steps'])} | {_n(r['rejected'])} | "
                     f"{_n(r.get('counted'))} | {_e(r['rel_err'])} | {_ms(r['fwdbwd_ms'])} | "
                     f"{_s(r['compile_s'])} | {_e(r.get('vs_fd'))} | {_e(r.get('vs_other'))} | "
                     f"{ratio.get(key, 'n/a')} |")
    return lines


def ratios(rows):
    peer = rows.get("diffrax-kvaerno5", {}).get("fwdbwd_ms")
    out = {}
    for key, r in rows.items():
        if peer and r.get("fwdbwd_ms"):
            out[key] = f"{r['fwdbwd_ms'] / peer:.2f}"
    return out


def render(problems, results, meta):
    lines = [
        "# Stiff problems: tfaca's ESDIRK solvers against diffrax and SciPy",
        "",
        f"`{meta['command']}` ({meta['reps']} repetitions, {meta['seconds']:.0f} s), tfaca "
        f"at {meta['commit']}. Machine: {meta['cpu']}"
        + (" (shared with other work: times within ~10-20% are noise)"
           if (os.cpu_count() or 0) <= 2 else "")
        + f"; one process, CPU only, float64. Python {meta['python']}, "
        f"{', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
        "## Forward+backward: tfaca / diffrax (target ≤ 1.0)",
        "",
    ]
    for name in results:
        rows = results[name]["gradients"]
        t, d = rows.get("tfaca-kvaerno5", {}), rows.get("diffrax-kvaerno5", {})
        if t.get("fwdbwd_ms") and d.get("fwdbwd_ms"):
            r = t["fwdbwd_ms"] / d["fwdbwd_ms"]
            verdict = "met" if r <= 1.0 else "missed"
            lines.append(f"- {problems[name].title}: tfaca Kvaerno5 + ACA "
                         f"{_ms(t['fwdbwd_ms'])} ms / diffrax Kvaerno5 {_ms(d['fwdbwd_ms'])} "
                         f"ms = {r:.2f} ({verdict}); their gradients differ by "
                         f"{_e(t.get('vs_other'))}, from finite differences by "
                         f"{_e(t.get('vs_fd'))} (tfaca) and {_e(d.get('vs_fd'))} (diffrax).")
        else:
            lines.append(f"- {problems[name].title}: n/a (diffrax did not run or an entry "
                         "failed)")
    lines += [
        "",
        "## How it is measured",
        "",
        "- Every solver at the problem's rtol/atol, float64, outputs interpolated at the "
        "output times (tfaca: cubic Hermite for the ESDIRK solvers; diffrax: its "
        "`SaveAt(ts=...)` interpolant; SciPy: `dense_output`), except the "
        "`interpolate=False` row, which steps onto every output time.",
        "- Reference: SciPy Radau at rtol 1e-10 (the atol stated per problem), restarted at "
        "each output time. **rel. error**: max over the output times (and samples) of "
        "|y - ref|∞ / |ref|∞. **error / tol**: max over every component of |y - ref| / "
        "(atol + rtol |ref|), the error in units of the tolerance asked for (a global "
        "error of a few units is on target; it shows a small component such as "
        "Robertson's y2 which the relative error hides).",
        "- Times: median of the repetitions after a first call; **compile s** = first "
        "call − median (tracing and XLA compilation). tfaca: a plain `tf.function`, the "
        "solve's default `jit_compile=\"auto\"` (its loops compiled with XLA); diffrax: "
        "`jax.jit`. SciPy has no compile step.",
        "- Counts. tfaca: `Solution.stats` (accepted, rejected, `num_fevals`, which leaves "
        "out the Jacobians); its Jacobians are one per trial (the simplified Newton "
        "iteration's, by construction). diffrax: accepted and rejected steps from "
        "`sol.stats`; evaluations counted by a `jax.debug.callback` in a separately "
        "compiled copy of the forward solve whose field is a `jax.custom_jvp` that counts "
        "its JVP rule's calls apart (the Jacobians). SciPy: `nfev`, `njev` (the analytic "
        "Jacobian, given to it) and `nlu`; accepted steps from the solution's step ends; "
        "rejected steps n/a. **f calls (fwd+bwd)**: every call of the vector field in a "
        "forward+backward, a Jacobian counting one (tfaca: a counter variable in the "
        "field, in a copy with `jit_compile=False`, which takes the same steps; diffrax: "
        "the callback in a separately compiled gradient).",
        "- Gradients: loss = sum over the output times after the start of |w · y|² / 2, "
        "with respect to y0 and the parameters. **gradient vs FD**: max over the entries "
        "of |g − fd| / |fd|, fd the central differences of the reference solve's loss "
        f"(step {FD_STEP:g} times the entry, {FD_STEP * FD_ZERO_SCALE:g} where it is 0); "
        "for the batch, along 4 random ±1 directions (each entry scaled as its step). "
        "**vs the other library**: the same between tfaca's and diffrax's gradients.",
        "- tfaca Dopri5: forward only, `throw=False`, to show where the explicit solver "
        f"stops (its `max_steps` is {meta['dopri_steps']:,} trials; the status and the time "
        "reached are in the last column; no error where it did not reach the last "
        "output).",
    ]
    for name, r in results.items():
        p = problems[name]
        lines += [
            "",
            f"## {p.title}",
            "",
            f"{p.note}. Outputs at t = {', '.join(f'{t:g}' for t in p.ts)}; rtol "
            f"{p.rtol:g}, atol {p.atol:g}; reference atol {p.ref_atol:g}; `max_steps` "
            f"{p.max_steps:,} (tfaca and diffrax).",
            "",
            "### Forward",
            "",
        ]
        lines += forward_table(p, r["forward"])
        lines += ["", "### Forward+backward", ""]
        lines += gradient_table(p, r["gradients"], ratios(r["gradients"]))
        kind = ("directional derivatives along 4 random directions" if r["fd_directional"]
                else "one entry each")
        lines += ["", f"Finite differences: {r['fd_count']} central differences ({kind}), "
                  f"{r['fd_seconds']:.0f} s of SciPy Radau"
                  + (" (the same as above)." if r["fd_shared"] else ".")]
        notes = _notes(r)
        if notes:
            lines += [""] + notes
    return "\n".join(lines) + "\n"


def _notes(result):
    notes = []
    fwd, grads = result["forward"], result["gradients"]
    interp, onto = fwd.get("tfaca-kvaerno5", {}), fwd.get("tfaca-kvaerno5-onto", {})
    if interp.get("tol_err") is not None and onto.get("tol_err") is not None:
        notes.append(f"- tfaca Kvaerno5's error at the output times: {interp['tol_err']:.3g} "
                     "tolerance units interpolated (cubic Hermite across its long steps), "
                     f"{onto['tol_err']:.3g} stepping onto them (`interpolate=False`).")
    gaps = [r["vs_fd"] for r in grads.values() if r.get("vs_fd") is not None]
    if gaps and min(gaps) > 0.1:
        notes.append("- No gradient is within 10% of the finite differences here: the "
                     "derivative of the discrete solve (ACA's, and diffrax's backpropagation "
                     "through its steps) is not under the error control, which measures the "
                     "state only; across Van der Pol's fast transitions the sensitivities "
                     "grow by orders of magnitude. At a tighter rtol they converge (the next "
                     "section).")
    for table in ("forward", "gradients"):
        for key, r in result[table].items():
            if "counted_steps" not in r:
                continue
            steps = (r["steps"], r["rejected"])
            if tuple(r["counted_steps"]) != steps:
                notes.append(f"- {LABELS[key]} ({table}): the counting copy (loops not "
                             f"compiled) took {r['counted_steps'][0]:,} steps and "
                             f"{r['counted_steps'][1]:,} rejected trials, the timed one "
                             f"{steps[0]:,} and {steps[1]:,} (rounding); its count is "
                             "that copy's.")
            trials = sum(r["counted_steps"])
            if table == "forward" and r["counted"] != r["counted_stats_fevals"] + trials:
                notes.append(f"- {LABELS[key]}: {r['counted']:,} field calls counted, "
                             f"against num_fevals + trials = "
                             f"{r['counted_stats_fevals'] + trials:,}.")
            if table == "gradients":
                backward = r["counted"] - r["counted_stats_fevals"] - trials
                notes.append(
                    f"- {LABELS[key]}, ACA: the backward (the replay) called the field "
                    f"{backward:,} times (a Jacobian counting one): per accepted step "
                    "f(t0, y0) and the Jacobian there, and per implicit stage the Newton "
                    "iterations rebuilding it, then a Jacobian and an evaluation at the "
                    "converged stage (the implicit function theorem); "
                    f"`stats.num_fevals_backward` says {r['fevals_bwd_stat']:,}.")
    return notes


def tfaca_commit():
    """The checkout's commit, and whether tfaca/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(HERE)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "tfaca"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"
    if not sha:
        return "an unknown commit"
    return f"commit {sha}" + (" with uncommitted changes in tfaca/" if dirty else "")


def versions():
    import importlib.metadata as md

    out = {}
    for name in ("tfaca", "tensorflow", "jax", "diffrax", "scipy", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Robertson to t = 40 only, 3 repetitions, no counting copies")
    parser.add_argument("--problems", default=None,
                        help="comma-separated, of robertson, robertson_tight, vdp, "
                             "vdp_tight, robertson_batch (default: all; --quick: "
                             "robertson)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "stiff.md"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--render-only", default=None, metavar="JSON",
                        help="re-write the report from a --json file, measuring nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        with open(args.render_only) as fh:
            saved = json.load(fh)
        quick = saved["meta"]["command"].split()[2:3] == ["--quick"]
        write_report(args.out, render(make_problems(quick), saved["results"], saved["meta"]))
        return saved["results"]
    reps = args.reps or (3 if args.quick else 10)
    problems = make_problems(args.quick)
    names = (args.problems.split(",") if args.problems else
             ["robertson"] if args.quick else
             ["robertson", "robertson_tight", "vdp", "vdp_tight", "robertson_batch"])
    started = time.time()
    results, cache = {}, {}
    for name in names:
        results[name] = benchmark(problems[name], args.quick, reps, cache)
    command = "python benchmarks/stiff.py" + (" --quick" if args.quick else "")
    if args.problems:
        command += f" --problems {args.problems}"
    meta = dict(command=command, reps=reps, seconds=time.time() - started, cpu=_cpu(),
                commit=tfaca_commit(),
                python=platform.python_version(), versions=versions(),
                dopri_steps=10000 if args.quick else 100000)
    write_report(args.out, render(problems, results, meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1,
                      default=lambda x: np.asarray(x).tolist())
    return results

if __name__ == "__main__":
    main()
