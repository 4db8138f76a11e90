"""A neural-CDE training step: tfaca against torchcde and diffrax's ControlTerm; writes
cde_step.md.

    python benchmarks/cde_step.py [--repeats N] [--quick] [--problems noisy,smooth]
                                  [--libs ...] [--rounds R] [--budget S] [--threads N]
                                  [--note TEXT] [--python PYTHON]
                                  [--out benchmarks/cde_step.md]
                                  [--json PATH] [--cache DIR] [--no-docs] [--render-only]

Run it with an interpreter that has the peers (`pip install -e ".[bench]"`, see
benchmarks/README.md); a peer that fails to import is reported as failed, never dropped.

The model (Kidger et al., 2020), the same formulas, float32 weights (seeded NumPy, copied
into every library) and data in every library:

- data: batch 32 series of 100 observations at the times `linspace(0, 1, 100)`, 20
  channels: channel 0 is the time, channels 1-19 are sinusoids (1-3 periods over the
  series, random phases) plus Gaussian noise of standard deviation 0.1 (`noisy`) or none
  (`smooth`); targets: standard normal, one per series;
- path: cubic Hermite with backward differences on the observations, the one kind all
  three libraries have (`tfaca.HermitePath`,
  `torchcde.hermite_cubic_coefficients_with_backward_differences` + `CubicSpline`,
  `diffrax.backward_hermite_coefficients` + `CubicInterpolation`; diffrax has no natural
  cubic spline). Each library's dX/dt is checked against a NumPy evaluation of the same
  formula (column "path err");
- z0 = X(t0) W0 + b0 (channels -> hidden 32); vector field f(z) = tanh(softplus(z W1 +
  b1) W2 + b2) reshaped to (batch, hidden, channels) (hidden -> width 64 -> hidden *
  channels = 640), dz = f(z) dX, solved as dz/dt = f(z) dX/dt from t0 to the last
  observation; loss = mean((z(T) W3 + b3 - target)^2);
- a training step = the loss and its gradients with respect to all eight weights (no
  optimizer update, in any library); Dopri5, rtol = atol = 1e-3 everywhere, each
  library's default gradient and step-size controller.

Entries: tfaca in its default mode (a plain `tf.function` around the step, as Keras'
`fit` runs on a CPU; the solve's `jit_compile="auto"` compiles its own loops; ACA), the
same with `Dopri5(error_estimate="shampine")` (`tfaca-shampine`: the embedded error
estimate torchdiffeq and diffrax use, so the same method as the peers; tfaca's default is
Dormand and Prince's own, as SciPy and the ACA paper's TorchDiffEqPack), and with the
whole step under `tf.function(jit_compile=True)`; torchcde `cdeint` with
`adjoint=False` (backprop through torchdiffeq's Dopri5) and with `adjoint=True`
(torchcde's own default); diffrax `ControlTerm(...).to_ode()` with a batched
matrix-vector product (a `lineax.FunctionLinearOperator`, one step size for the batch as
in tfaca and torchcde), `PIDController`, `RecursiveCheckpointAdjoint` (its default), the
step in `jax.jit`. All three leave the Hermite path's knots (where its second derivative
jumps) to the error control and choose their steps freely: the primary comparison, and
the one the target is judged on. The `-knots` entries make each library step onto every
observation time instead (tfaca: the observation times as output times with
`interpolate=False`, the last output kept; torchdiffeq's `options=dict(step_t=times)`;
diffrax's `ClipStepSizeController(step_ts=times)`): the same discretisation, so the same
accepted steps and the same loss to rounding, reported apart.

Diagnostics (`DIAGNOSTICS`, a table of their own, never in the target): tfaca's default
mode with dX/dt evaluated inside `func` from the path it closes over (`tfaca-closure`: a
closed-over tensor that no tape watches is not differentiated, so this is the step
without the path's gradients), and torchcde with torchdiffeq's Dopri5 given tfaca's
default error estimate (`torchcde-dpweights`): how much of the difference in steps the
estimate explains.

Every (problem, entry) runs in a child process of its own (this file with --child), pinned
to --threads cores (default: every core this process may use) with each library's thread
pools set to that count; the set runs --rounds times, every other round in reverse
order, and an entry's time is the median over every round's repetitions of the whole
step after two warm-up calls (the first, timed apart, traces and compiles). Losses and
gradients are compared with tfaca in float64 at rtol = atol = 1e-8, stepping onto every
knot (cached in benchmarks/.cache/). The fraction of the machine that other processes used while each
child ran is reported (this 2-core VM is shared).

Target (the issue): tfaca's default mode at most 0.7x the faster peer, judged against
the peers as they choose their steps, with tfaca's default Dopri5 and with the peers'
error estimate (tfaca's XLA mode, and `tfaca-knots` against the peers' `-knots` entries,
are reported, not judged). Writes --out (default
benchmarks/cde_step.md) and the summary between `<!-- cde-step:start -->` and
`<!-- cde-step:end -->` in BENCHMARKS.md (a "Neural CDE training step" section appended at
its end when the markers are missing, as after benchmarks/run.py rewrites it); --no-docs
leaves BENCHMARKS.md alone.

Time with one thread (--threads 1): --quick (the noisy data, tfaca in both modes,
torchcde and diffrax, one round of 3 repetitions) ~2 minutes, most of it TensorFlow's and
XLA's compilation (~10 s per tfaca child); the full run ~15-25 minutes (torchcde's adjoint
takes 5-15 s a step and gets fewer repetitions, --budget). --note adds a line about the
machine's other load to the report. --render-only re-writes the reports from --json.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# ----------------------------------------------------------------------------- the problem

BATCH, CHANNELS, HIDDEN, WIDTH, OBSERVATIONS = 32, 20, 32, 64, 100
T_END = 1.0
RTOL = ATOL = 1e-3
REF_TOL = 1e-8
SEED = 29
# Standard deviation of the noise on the sinusoids, per problem.
PROBLEMS = {"noisy": 0.1, "smooth": 0.0}
TARGET = 0.7
WEIGHT_NAMES = ["W0", "b0", "W1", "b1", "W2", "b2", "W3", "b3"]

ORDER = ["tfaca", "tfaca-shampine", "tfaca-xla", "tfaca-knots", "torchcde", "torchcde-knots",
         "torchcde-adjoint", "diffrax", "diffrax-knots"]
# Measured apart, never in the target: what tfaca's step costs without the path's gradients,
# and the peers' steps with tfaca's default error estimate (see the docstring).
DIAGNOSTICS = ["tfaca-closure", "torchcde-dpweights"]
LABELS = {
    "tfaca": ("tfaca", "default mode: tf.function, ACA (solver loops compiled, "
                       "`jit_compile=\"auto\"`)"),
    "tfaca-shampine": ("tfaca", "default mode, Dopri5(error_estimate=\"shampine\"): the "
                                "peers' error estimate"),
    "tfaca-xla": ("tfaca", "ACA, step in tf.function(jit_compile=True)"),
    "tfaca-knots": ("tfaca", "default mode, ts=times with interpolate=False"),
    "torchcde": ("torchcde", "cdeint(adjoint=False): backprop through Dopri5"),
    "torchcde-knots": ("torchcde", "cdeint(adjoint=False), options=dict(step_t=times)"),
    "torchcde-adjoint": ("torchcde", "cdeint(adjoint=True) (torchcde's default)"),
    "diffrax": ("diffrax", "ControlTerm, PIDController, RecursiveCheckpointAdjoint, jit"),
    "diffrax-knots": ("diffrax", "the same, ClipStepSizeController(step_ts=times)"),
    "tfaca-closure": ("tfaca", "default mode, dX/dt evaluated in func from the closed-over "
                               "path (tfaca.solve): no path gradients"),
    "torchcde-dpweights": ("torchcde", "cdeint(adjoint=False), Dopri5 with tfaca's default "
                                       "error estimate (Dormand-Prince 4th-order weights)"),
}
# Which entries step onto every observation time.
ON_KNOTS = {"tfaca-knots", "torchcde-knots", "diffrax-knots"}
TFACA = ["tfaca", "tfaca-shampine", "tfaca-xla", "tfaca-knots", "tfaca-closure"]
# The peers as their users get them (their own step choice), and stepping onto the knots.
FREE_PEERS = ["torchcde", "torchcde-adjoint", "diffrax"]
KNOT_PEERS = ["torchcde-knots", "diffrax-knots"]
ALL = ORDER + DIAGNOSTICS
QUICK_LIBS = ["tfaca", "tfaca-shampine", "tfaca-xla", "torchcde", "diffrax"]
DIST = ["tfaca", "tensorflow", "keras", "torch", "torchdiffeq", "torchcde", "jax", "jaxlib",
        "diffrax", "equinox", "lineax", "numpy"]
CACHE = os.path.join(HERE, ".cache")


def make_problem(name):
    """times (n,), values (batch, n, channels), targets (batch, 1), weights [(name, array)]
    in TensorFlow's layout (x W + b), all float32 and seeded."""
    rng = np.random.default_rng(SEED)
    times = np.linspace(0.0, T_END, OBSERVATIONS)
    periods = rng.uniform(1.0, 3.0, (BATCH, 1, CHANNELS - 1))
    phases = rng.uniform(0.0, 2 * np.pi, (BATCH, 1, CHANNELS - 1))
    noise = rng.standard_normal((BATCH, OBSERVATIONS, CHANNELS - 1))
    signal = np.sin(2 * np.pi * periods * times[None, :, None] / T_END + phases)
    signal = signal + PROBLEMS[name] * noise
    values = np.concatenate([np.broadcast_to(times[None, :, None], (BATCH, OBSERVATIONS, 1)),
                             signal], axis=-1)
    targets = rng.standard_normal((BATCH, 1))

    def linear(fan_in, fan_out):  # torch.nn.Linear's initialisation
        s = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-s, s, (fan_in, fan_out)), rng.uniform(-s, s, (fan_out,))

    weights = [*linear(CHANNELS, HIDDEN), *linear(HIDDEN, WIDTH),
               *linear(WIDTH, HIDDEN * CHANNELS), *linear(HIDDEN, 1)]
    f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
    return dict(times=f32(times), values=f32(values), targets=f32(targets),
                weights=[(n, f32(w)) for n, w in zip(WEIGHT_NAMES, weights)])


def query_times(times, count=397):
    """Times strictly inside the pieces, where every library's dX/dt is compared."""
    t0, t1 = float(times[0]), float(times[-1])
    return (t0 + (t1 - t0) * (np.arange(count) + 0.5) / count).astype(times.dtype)


def hermite_derivative(times, values, t):
    """dX/dt of the cubic Hermite path with backward differences (Kidger et al., 2021) at
    the times `t`, in NumPy (float64): `[len(t), batch, channels]`."""
    times = np.asarray(times, np.float64)
    values = np.asarray(values, np.float64)
    dt = np.diff(times)
    slope = np.diff(values, axis=1) / dt[None, :, None]
    start = np.concatenate([slope[:, :1], slope[:, :-1]], axis=1)
    c = 2.0 * (slope - start) / dt[None, :, None]
    d = (start - slope) / dt[None, :, None] ** 2
    piece = np.clip(np.searchsorted(times, t, side="left") - 1, 0, len(dt) - 1)
    s = (np.asarray(t, np.float64) - times[piece])[:, None, None]
    b_, c_, d_ = (np.moveaxis(x[:, piece], 1, 0) for x in (start, c, d))
    return b_ + s * (2.0 * c_ + 3.0 * s * d_)


def _rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------- entries
#
# Each builder returns (step, counts, path_derivative): `step()` runs one training step and
# returns (loss, [8 gradients as NumPy, TF layout]) once every result is computed;
# `counts()` the steps and evaluations of the last step (may run instrumented copies);
# `path_derivative(t)` the library's dX/dt at the times t, [len(t), batch, channels].


def build_tfaca(p, variant="tfaca", dtype="float32", rtol=RTOL, atol=ATOL, max_steps=1000):
    """`variant`: an entry of TFACA (`"tfaca-knots"` also makes the float64 reference)."""
    import tensorflow as tf

    import tfaca

    cast = lambda x: tf.constant(np.asarray(x, dtype))  # noqa: E731
    ws = [tf.Variable(np.asarray(w, dtype), name=n) for n, w in p["weights"]]
    w0, b0, w1, b1, w2, b2, w3, b3 = ws
    times, values, targets = cast(p["times"]), cast(p["values"]), cast(p["targets"])

    def field(t, z):
        h = tf.nn.softplus(tf.matmul(z, w1) + b1)
        return tf.reshape(tf.tanh(tf.matmul(h, w2) + b2), (-1, HIDDEN, CHANNELS))

    options = dict(rtol=rtol, atol=atol, max_steps=max_steps)
    if variant == "tfaca-shampine":
        options["method"] = tfaca.Dopri5(error_estimate="shampine")

    @tf.function(jit_compile=variant == "tfaca-xla")
    def train_step(times, values, targets):
        with tf.GradientTape() as tape:
            path = tfaca.HermitePath(times, values)
            z0 = tf.matmul(values[:, 0], w0) + b0
            ends = tf.stack([times[0], times[-1]])
            if variant == "tfaca-knots":
                # The observation times as output times, stepped onto (interpolate=False):
                # every knot is a step's end, as the peers' step_t/step_ts.
                sol = tfaca.solve_cde(field, z0, path, times, interpolate=False, **options)
            elif variant == "tfaca-closure":
                # The same ODE, dX/dt read from the path func closes over: no tape watches
                # its tensors, so the solve's gradient leaves them out.
                def controlled(t, z):
                    return tf.linalg.matvec(field(t, z), path.derivative(t))

                sol = tfaca.solve(controlled, z0, ends, **options)
            else:
                sol = tfaca.solve_cde(field, z0, path, ends, **options)
            pred = tf.matmul(sol.ys[-1], w3) + b3
            loss = tf.reduce_mean((pred - targets) ** 2)
        grads = tape.gradient(loss, ws)
        st = sol.stats
        return loss, grads, (st.num_steps, st.num_rejected, st.num_fevals,
                             st.num_fevals_backward, sol.status)

    last = {}

    def step():
        loss, grads, stats = train_step(times, values, targets)
        last["stats"] = stats
        return float(loss), [g.numpy() for g in grads]

    def counts():
        steps, rejected, nfe_f, nfe_b, status = (int(x) for x in last["stats"])
        if status != 0:
            raise RuntimeError(f"tfaca's solve failed, status {status}")
        return dict(steps=steps, rejected=rejected, nfe_fwd=nfe_f, nfe_bwd=nfe_b,
                    nfe_source="Solution.stats")

    def path_derivative(t):
        path = tfaca.HermitePath(times, values)
        return np.stack([path.derivative(tf.constant(ti, times.dtype)).numpy() for ti in t])

    return step, counts, path_derivative


def _dormand_prince_estimate():
    """Gives torchdiffeq's Dopri5 tfaca's default error estimate (`tfaca.Dopri5()`: b_sol
    less Dormand and Prince's 4th-order weights, as SciPy's RK45; torchdiffeq and diffrax
    use Shampine's). For the diagnostic entry, in its own process."""
    import torch
    from torchdiffeq._impl import dopri5

    import tfaca

    tableau = dopri5.Dopri5Solver.tableau
    dopri5.Dopri5Solver.tableau = tableau._replace(c_error=torch.tensor(
        tfaca.Dopri5().tableau.b_error, dtype=tableau.c_error.dtype))


def build_torchcde(p, adjoint, knots, control=None):
    """`control`: None or `"dpweights"` (`_dormand_prince_estimate`)."""
    import torch
    import torchcde
    from torchdiffeq._impl import rk_common

    if control == "dpweights":
        _dormand_prince_estimate()

    params = [torch.nn.Parameter(torch.tensor(w)) for _, w in p["weights"]]
    w0, b0, w1, b1, w2, b2, w3, b3 = params

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList([w1, b1, w2, b2])  # the adjoint's
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            h = torch.nn.functional.softplus(z @ w1 + b1)
            return torch.tanh(h @ w2 + b2).view(-1, HIDDEN, CHANNELS)

    field = Field()
    times, values = torch.tensor(p["times"]), torch.tensor(p["values"])
    targets = torch.tensor(p["targets"])
    # Computed once, before training, as torchcde's documentation does.
    coeffs = torchcde.hermite_cubic_coefficients_with_backward_differences(values, times)
    kwargs = dict(method="dopri5", rtol=RTOL, atol=ATOL)
    if knots:
        kwargs["options"] = dict(step_t=times)

    def solve(x0):
        path = torchcde.CubicSpline(coeffs, times)
        z0 = x0 @ w0 + b0
        return torchcde.cdeint(X=path, func=field, z0=z0, t=path.interval, adjoint=adjoint,
                               **kwargs)[:, -1]

    def step():
        z_end = solve(values[:, 0])
        loss = ((z_end @ w3 + b3 - targets) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), [g.numpy() for g in grads]

    def counts():
        original = rk_common.RKAdaptiveStepsizeODESolver._adaptive_step
        tally = {"acc": 0, "rej": 0}

        def counted(solver, state):
            new = original(solver, state)
            tally["acc" if bool(new.t1 != state.t1) else "rej"] += 1
            return new

        rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = counted
        try:
            field.nfe = 0
            z_end = solve(values[:, 0])
            nfe_fwd = field.nfe
            steps, rejected = tally["acc"], tally["rej"]  # the forward solve's alone
            loss = ((z_end @ w3 + b3 - targets) ** 2).mean()
            torch.autograd.grad(loss, params)
        finally:
            rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = original
        # cdeint evaluates func once more before solving, to check shapes: not counted.
        return dict(steps=steps, rejected=rejected, nfe_fwd=nfe_fwd - 1,
                    nfe_bwd=field.nfe - nfe_fwd,
                    nfe_source="counter in func (less cdeint's shape check); steps by "
                               "wrapping torchdiffeq's _adaptive_step")

    def path_derivative(t):
        path = torchcde.CubicSpline(coeffs, times)
        with torch.no_grad():
            return np.stack([path.derivative(torch.tensor(ti)).numpy() for ti in t])

    return step, counts, path_derivative


def build_diffrax(p, knots, quick):
    import diffrax
    import jax
    import jax.numpy as jnp
    import lineax as lx

    params = [jnp.asarray(w) for _, w in p["weights"]]
    times = jnp.asarray(p["times"])
    observations = jnp.asarray(p["values"].transpose(1, 0, 2))  # time first
    # Computed once, before training, as diffrax's neural CDE example does.
    coeffs = diffrax.backward_hermite_coefficients(times, observations)
    data = (times, coeffs, jnp.asarray(p["values"][:, 0]), jnp.asarray(p["targets"]))
    structure = jax.ShapeDtypeStruct((BATCH, CHANNELS), jnp.float32)
    tally = {"n": 0}

    def tick():
        tally["n"] += 1

    def loss_fn(params, data, counting=False):
        w0, b0, w1, b1, w2, b2, w3, b3 = params
        ts, coeffs, x0, targets = data
        path = diffrax.CubicInterpolation(ts, coeffs)

        def vector_field(t, z, args):
            if counting:
                jax.debug.callback(tick)
            w1, b1, w2, b2 = args
            m = jnp.tanh(jax.nn.softplus(z @ w1 + b1) @ w2 + b2).reshape(-1, HIDDEN, CHANNELS)
            # The batch's matrix-vector products, one step size for the batch.
            return lx.FunctionLinearOperator(lambda dx: jnp.einsum("bhc,bc->bh", m, dx),
                                             structure)

        controller = diffrax.PIDController(rtol=RTOL, atol=ATOL)
        if knots:
            controller = diffrax.ClipStepSizeController(controller, step_ts=ts)
        sol = diffrax.diffeqsolve(
            diffrax.ControlTerm(vector_field, path).to_ode(), diffrax.Dopri5(), ts[0], ts[-1],
            None, x0 @ w0 + b0, args=(w1, b1, w2, b2), stepsize_controller=controller,
            saveat=diffrax.SaveAt(t1=True))
        pred = sol.ys[-1] @ w3 + b3
        return jnp.mean((pred - targets) ** 2), sol.stats

    train_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    last = {}

    def step():
        (loss, stats), grads = train_step(params, data)
        jax.block_until_ready(grads)
        last["stats"] = stats
        return float(loss), [np.asarray(g) for g in grads]

    def counts():
        st = {k: int(v) for k, v in last["stats"].items()}
        out = dict(steps=st["num_accepted_steps"], rejected=st["num_rejected_steps"],
                   nfe_fwd=None, nfe_bwd=None, nfe_source="--quick: not counted")
        if not quick:  # a separately compiled copy with a callback in the vector field
            tally["n"] = 0
            jax.block_until_ready(jax.jit(lambda p, d: loss_fn(p, d, True))(params, data))
            jax.effects_barrier()
            nfe_fwd = tally["n"]
            tally["n"] = 0
            jax.block_until_ready(jax.jit(jax.value_and_grad(
                lambda p, d: loss_fn(p, d, True), has_aux=True))(params, data))
            jax.effects_barrier()
            out.update(nfe_fwd=nfe_fwd, nfe_bwd=tally["n"] - nfe_fwd,
                       nfe_source="jax.debug.callback counter in separately compiled copies")
        return out

    def path_derivative(t):
        path = diffrax.CubicInterpolation(times, coeffs)
        return np.asarray(jax.vmap(path.derivative)(jnp.asarray(t)))

    return step, counts, path_derivative


def build(lib, p, quick):
    if lib in TFACA:
        return build_tfaca(p, variant=lib)
    if lib.startswith("torchcde"):
        control = lib.split("-")[1] if lib in DIAGNOSTICS else None
        return build_torchcde(p, adjoint=lib == "torchcde-adjoint", knots=lib.endswith("knots"),
                              control=control)
    if lib.startswith("diffrax"):
        return build_diffrax(p, knots=lib.endswith("knots"), quick=quick)
    raise ValueError(f"unknown entry {lib!r}")


# ----------------------------------------------------------------------------- the child

def _set_threads(threads):
    """Pins this process to `threads` cores and sizes every library's pools to match;
    before any framework is imported."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1:  # XLA's CPU runtime (JAX) otherwise runs Eigen on a pool of its own
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_"
                                   "eigen=false intra_op_parallelism_threads=1").strip()


def _set_library_threads(lib, threads):
    if lib in TFACA or lib == "reference":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif lib.startswith("torchcde"):
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)


def measure(lib, problem, repeats, budget, quick, grads_path):
    p = make_problem(problem)
    out = dict(lib=lib, problem=problem)
    t0 = time.perf_counter()
    step, counts, path_derivative = build(lib, p, quick)
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss, grads = step()
    out["first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()  # a second warm-up (allocators, caches)
    warm = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget / max(warm, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["loss"] = loss
    out.update(counts())
    tq = query_times(p["times"])
    reference = hermite_derivative(p["times"], p["values"], tq)
    out["path_err"] = _rel(path_derivative(tq), reference)
    out["finite"] = bool(np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads))
    np.savez(grads_path, *grads)
    return out


def reference(problem, path):
    """tfaca in float64 at rtol = atol = REF_TOL, stepping onto every knot (the path's
    second derivative jumps there, which the error control would otherwise have to find):
    the loss and gradients every entry is compared with."""
    p = make_problem(problem)
    step, counts, _ = build_tfaca(p, variant="tfaca-knots", dtype="float64", rtol=REF_TOL,
                                  atol=REF_TOL, max_steps=20000)
    loss, grads = step()
    np.savez(path, np.float64(loss), *grads)
    return dict(problem=problem, loss=loss, **counts())


def child_main(a):
    _set_threads(a.threads)
    try:
        _set_library_threads(a.child, a.threads)
        if a.child == "reference":
            out = reference(a.problem, a.grads)
        else:
            out = measure(a.child, a.problem, a.repeats, a.budget, a.quick, a.grads)
    except Exception as e:  # reported in the table, never hidden
        msg = " ".join(x.strip() for x in str(e).splitlines() if x.strip())
        out = dict(lib=a.child, problem=a.problem, error=f"{type(e).__name__}: {msg[:300]}",
                   traceback=traceback.format_exc()[-3000:])
    print("@@RESULT@@" + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent

def _child_env():
    from run import BASE_ENV

    env = dict(os.environ)
    env.update(BASE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def _run_child(python, args, timeout=1800):
    """One child's result, with `other_load`: the fraction of the machine's CPU time that
    other processes used while it ran."""
    from outputs import _busy_seconds, _children_seconds

    b0, c0, w0 = _busy_seconds(), _children_seconds(), time.perf_counter()
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--child"] + args,
                              env=_child_env(), cwd=HERE, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    wall = time.perf_counter() - w0
    other = (_busy_seconds() - b0) - (_children_seconds() - c0)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@@RESULT@@"):
            return dict(json.loads(line[len("@@RESULT@@"):]), wall_s=wall,
                        other_load=max(other, 0.0) / (wall * os.cpu_count()))
    return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])


def _ref_path(problem, cache):
    h = hashlib.sha256()
    p = make_problem(problem)
    for key in ("times", "values", "targets"):
        h.update(p[key].tobytes())
    for n, w in p["weights"]:
        h.update(n.encode() + w.tobytes())
    h.update(repr((RTOL, ATOL, REF_TOL, "hermite", "onto the knots")).encode())
    os.makedirs(cache, exist_ok=True)
    return os.path.join(cache, f"cde_ref_{problem}_{h.hexdigest()[:12]}.npz")


def _load_npz(path):
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _merge(rounds):
    """One result per entry from its rounds: every round's repetitions pooled (and each
    round's median, `round_s`), the first call and the counts from the first round, the
    largest other load."""
    first = rounds[0]
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    out = dict(first)
    out["times_s"] = [t for r in rounds for t in r["times_s"]]
    out["step_s"] = float(np.median(out["times_s"]))
    out["round_s"] = [float(np.median(r["times_s"])) for r in rounds]
    out["other_load"] = max(r["other_load"] for r in rounds)
    out["first_s"] = max(first["first_s"] - out["step_s"], 0.0)  # trace + compile
    return out


def run(a):
    problems = a.problems.split(",")
    libs = a.libs.split(",")
    for x in problems:
        if x not in PROBLEMS:
            raise SystemExit(f"--problems must name some of {', '.join(PROBLEMS)}: {x!r}")
    for x in libs:
        if x not in LABELS:
            raise SystemExit(f"--libs must name some of {', '.join(ALL)}: {x!r}")
    libs = [x for x in ALL if x in libs]
    start = time.perf_counter()
    common = ["--threads", str(a.threads)] + (["--quick"] if a.quick else [])
    refs = {}
    for problem in problems:
        path = _ref_path(problem, a.cache)
        if not os.path.exists(path):
            r = _run_child(a.python, ["reference", "--problem", problem, "--grads", path]
                           + common)
            if "error" in r:
                raise SystemExit(f"the float64 reference failed: {r['error']}")
            print(f"{problem}: float64 reference loss {r['loss']:.6g} ({r['steps']} steps, "
                  f"{r['wall_s']:.0f} s)", flush=True)
        ref = _load_npz(path)
        refs[problem] = dict(loss=float(ref[0]), grads=ref[1:])
    order = [(p, lib) for p in problems for lib in libs]
    measured = {}
    grads = {}
    scratch = os.path.join(a.cache, "cde_step_grads")
    os.makedirs(scratch, exist_ok=True)
    for k in range(a.rounds):
        for problem, lib in (order if k % 2 == 0 else order[::-1]):
            gpath = os.path.join(scratch, f"{problem}_{lib}.npz")
            r = _run_child(a.python, [lib, "--problem", problem, "--repeats", str(a.repeats),
                                      "--budget", str(a.budget), "--grads", gpath] + common)
            measured.setdefault((problem, lib), []).append(r)
            if "error" in r:
                print(f"{problem} {lib}: FAILED: {r['error']}", flush=True)
                continue
            if k == 0:
                grads[(problem, lib)] = _load_npz(gpath)
            print(f"{problem} {lib} (round {k + 1}): {np.median(r['times_s']) * 1e3:.1f} ms "
                  f"per step ({len(r['times_s'])} runs), first call {r['first_s']:.1f} s, "
                  f"steps {r['steps']}/{r['rejected']}, loss {r['loss']:.6g}, other load "
                  f"{r['other_load']:.0%}", flush=True)
    results = {}
    for (problem, lib), rounds in measured.items():
        r = _merge(rounds)
        if "error" not in r:
            ref = refs[problem]
            g = grads[(problem, lib)]
            r["loss_err"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
            r["grad_err"] = _rel(np.concatenate([x.ravel() for x in g]),
                                 np.concatenate([x.ravel() for x in ref["grads"]]))
            # Against tfaca stepping alike: onto the knots or freely.
            base = grads.get((problem, "tfaca-knots" if lib in ON_KNOTS else "tfaca"))
            if base is not None:
                r["grad_vs_tfaca"] = _rel(np.concatenate([x.ravel() for x in g]),
                                          np.concatenate([x.ravel() for x in base]))
        results.setdefault(problem, {})[lib] = r
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                total_s=time.perf_counter() - start, quick=a.quick, rounds=a.rounds,
                repeats=a.repeats, budget=a.budget, threads=a.threads, problems=problems,
                libs=libs, command=_command(a), versions=_versions(a.python), note=a.note,
                ref_loss={p: refs[p]["loss"] for p in problems})
    return results, meta


def _command(a):
    parts = ["python benchmarks/cde_step.py"]
    if a.quick:
        parts.append("--quick")
    if a.repeats != (3 if a.quick else 10):
        parts.append(f"--repeats {a.repeats}")
    if a.rounds != (1 if a.quick else 2):
        parts.append(f"--rounds {a.rounds}")
    if a.problems != ",".join(["noisy"] if a.quick else PROBLEMS):
        parts.append(f"--problems {a.problems}")
    if a.libs != ",".join(QUICK_LIBS if a.quick else ALL):
        parts.append(f"--libs {a.libs}")
    if a.threads != len(os.sched_getaffinity(0)):
        parts.append(f"--threads {a.threads}")
    return " ".join(parts)


def _versions(python):
    code = ("import importlib.metadata as m, json\nout = {}\n"
            f"for d in {DIST!r}:\n"
            "    try: out[d] = m.version(d)\n"
            "    except Exception: out[d] = None\n"
            "print(json.dumps(out))\n")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                           cwd=HERE)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {}


# ----------------------------------------------------------------------------- the report

def _ok(r):
    return r is not None and "error" not in r


def _ms(x):
    return "n/a" if x is None else (f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}")


def _sci(x):
    return "n/a" if x is None else f"{x:.1e}"


def _faster(rows, libs):
    done = {k: rows[k] for k in libs if _ok(rows.get(k))}
    if not done:
        return None
    return min(done, key=lambda k: done[k]["step_s"])


def targets(results, problems):
    """The issue's target, one line per (problem, tfaca entry): its time per step over the
    faster peer's. tfaca's default mode against the peers choosing their own steps is
    judged; its XLA mode (the same peers) and `tfaca-knots` (against the peers stepping onto
    the knots) are reported. A peer set of which nothing ran is a miss, never a pass."""
    lines = []
    for problem in problems:
        rows = results.get(problem, {})
        for mode, peers, what, judged in (
                ("tfaca", FREE_PEERS, "the faster peer choosing its own steps", True),
                ("tfaca-shampine", FREE_PEERS, "the faster peer choosing its own steps", True),
                ("tfaca-xla", FREE_PEERS, "the faster peer choosing its own steps", False),
                ("tfaca-knots", KNOT_PEERS, "the faster peer stepping onto the knots", False)):
            a = rows.get(mode)
            if a is None:
                continue
            tried = [k for k in peers if k in rows]
            best = _faster(rows, peers)
            name = {"tfaca": "default mode", "tfaca-xla": "XLA",
                    "tfaca-shampine": "default mode with the peers' error estimate",
                    "tfaca-knots": "onto the knots"}[mode]
            head = f"- {problem}: tfaca {name} / {what}"
            if not _ok(a) or best is None:
                why = "tfaca failed" if not _ok(a) else (
                    "no such peer ran" if not tried else "every such peer failed")
                lines.append(f"{head}: n/a, {why}"
                             + (f" (target ≤ {TARGET:g}: MISS)" if judged else ""))
                continue
            v = a["step_s"] / rows[best]["step_s"]
            # Three decimals where two would round onto the target.
            shown = f"{v:.3f}" if round(v, 2) == TARGET else f"{v:.2f}"
            verdict = (f" (target ≤ {TARGET:g}: {'PASS' if v <= TARGET else 'MISS'})"
                       if judged else " (not judged)")
            ra, rb = a.get("round_s") or [], rows[best].get("round_s") or []
            per_round = (" (each round's medians: " + ", ".join(
                f"{x / y:.2f}" for x, y in zip(ra, rb)) + ")"
                if len(ra) > 1 and len(ra) == len(rb) else "")
            lines.append(f"{head} ({best}): {_ms(a['step_s'])} / "
                         f"{_ms(rows[best]['step_s'])} ms = {shown}{verdict}{per_round}")
    return "\n".join(lines)


def table(results, problems, libs):
    head = ("| data | library | mode | steps onto knots | ms per step | × tfaca default | "
            "rounds' medians ms | first call s | steps acc/rej | f-evals fwd/bwd | loss | "
            "rel. err loss | rel. err grads | grads vs tfaca alike | path err | other load |")
    lines = [head, "|" + "---|" * 16]
    for problem in problems:
        rows = results.get(problem, {})
        base = rows.get("tfaca")
        for lib in libs:
            r = rows.get(lib)
            if r is None:
                continue
            name, mode = LABELS[lib]
            knots = "yes" if lib in ON_KNOTS else "no"
            if "error" in r:
                lines.append(f"| {problem} | {name} | {mode} | {knots} | FAILED: "
                             f"{r['error'][:200]} |" + " |" * 12)
                continue
            ratio = (f"{r['step_s'] / base['step_s']:.2f}" if _ok(base) else "n/a")
            nfe = (f"{r['nfe_fwd']}/{r['nfe_bwd']}" if r.get("nfe_fwd") is not None else "n/a")
            lines.append(
                f"| {problem} | {name} | {mode} | {knots} | {_ms(r['step_s'])} | {ratio} | "
                f"{' / '.join(_ms(x) for x in r.get('round_s') or []) or 'n/a'} | "
                f"{r['first_s']:.1f} | {r['steps']}/{r['rejected']} | {nfe} | "
                f"{r['loss']:.5f} | {_sci(r.get('loss_err'))} | {_sci(r.get('grad_err'))} | "
                f"{_sci(r.get('grad_vs_tfaca'))} | {_sci(r.get('path_err'))} | "
                f"{r['other_load']:.0%} |")
    return "\n".join(lines)


def summary_table(results, problems, libs):
    """BENCHMARKS.md's table: per data set, ms per step, accepted steps and the gradients'
    error."""
    lines = ["| library | mode | " + " | ".join(
        f"{p}: ms | {p}: steps | {p}: grad err" for p in problems) + " |",
        "|---|---|" + "---|---|---|" * len(problems)]
    for lib in libs:
        cells = []
        for problem in problems:
            r = results.get(problem, {}).get(lib)
            if r is None:
                cells += ["n/a"] * 3
            elif "error" in r:
                cells += ["FAILED", "", ""]
            else:
                cells += [_ms(r["step_s"]), f"{r['steps']}/{r['rejected']}",
                          _sci(r.get("grad_err"))]
        name, mode = LABELS[lib]
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics(results, problems):
    """The diagnostics' findings, one line each: the share of tfaca's default step that
    its path's gradients take, and the accepted steps of tfaca's Dopri5 with either error
    estimate against the peers' and torchdiffeq's with tfaca's default estimate."""
    lines = []
    for problem in problems:
        rows = results.get(problem, {})
        a, closure = rows.get("tfaca"), rows.get("tfaca-closure")
        if _ok(a) and _ok(closure):
            share = 1.0 - closure["step_s"] / a["step_s"]
            lines.append(
                f"- {problem}: path gradients: tfaca default {_ms(a['step_s'])} ms "
                f"({a['steps']}/{a['rejected']} steps), the path closed over in func (no "
                f"path gradients) {_ms(closure['step_s'])} ms ({closure['steps']}/"
                f"{closure['rejected']} steps): the path's gradients take {share:.0%} of the "
                f"step")
        steps = [(k, rows[k]) for k in ("tfaca", "tfaca-shampine", "torchcde", "diffrax",
                                        "torchcde-dpweights") if _ok(rows.get(k))]
        if steps:
            lines.append(f"- {problem}: accepted/rejected steps: " + ", ".join(
                f"{k} {r['steps']}/{r['rejected']}" for k, r in steps))
    return "\n".join(lines)


def _threads(n):
    return "1 thread" if n == 1 else f"{n} threads"


def _bullet(text):
    return textwrap.fill(text, 90, initial_indent="- ", subsequent_indent="  ")


def _problem_text():
    return (f"batch {BATCH} series of {OBSERVATIONS} observations at the times linspace(0, "
            f"{T_END:g}, {OBSERVATIONS}), {CHANNELS} channels (channel 0 the time, channels "
            f"1-{CHANNELS - 1} sinusoids of 1-3 periods with random phases, plus N(0, "
            f"{PROBLEMS['noisy']:g}²) noise for the noisy data, none for the smooth), cubic "
            f"Hermite path with backward differences, z0 = X(t0) W0 + b0 (hidden {HIDDEN}), "
            f"f(z) = tanh(softplus(z W1 + b1) W2 + b2) reshaped to (batch, {HIDDEN}, "
            f"{CHANNELS}) (width {WIDTH}), loss = mean((z(T) W3 + b3 - y)²) against N(0, 1) "
            f"targets; gradients of all eight weights, no optimizer update; Dopri5 at rtol = "
            f"atol = {RTOL:g}, float32, seed {SEED} (benchmarks/cde_step.py `make_problem`)")


def render(results, meta):
    from run import _cpu

    problems, libs = meta["problems"], meta["libs"]
    main_libs = [k for k in libs if k not in DIAGNOSTICS]
    diag_libs = [k for k in libs if k in DIAGNOSTICS]
    ver = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    missing = [k for k in ("torchcde", "diffrax") if not meta["versions"].get(k)]
    rounds = ("one round" if meta["rounds"] == 1 else
              f"{meta['rounds']} rounds (every other one in reverse order)")
    threads = meta["threads"]
    times = (f"Times: median over {rounds} of {meta['repeats']} repetitions each (fewer for a "
             f"step over {meta['budget']:g} s / {meta['repeats']}) of the whole training step, "
             "after a first call (\"first call s\": that call less the median, the trace and "
             "compilation) and a second warm-up call (\"rounds' medians ms\": each round's "
             "own, the spread that the machine's other load gives); each entry in a child "
             "process of its "
             f"own, pinned to {threads} core{'s' if threads > 1 else ''}, with TensorFlow's "
             "intra- and inter-op pools, "
             f"torch's intra- and inter-op threads and OpenMP at {threads}"
             + (" and XLA's CPU runtime (JAX) without its Eigen thread pool "
                "(--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1)"
                if threads == 1 else "")
             + " (OMP_WAIT_POLICY=PASSIVE, as benchmarks/run.py)")
    machine = (f"Measured with {_threads(threads)} per library on a {os.cpu_count()}-core "
               "machine" + (f": {meta['note']}" if meta.get("note") else ""))
    check = ("\"rel. err loss\" and \"rel. err grads\" (all eight gradients together, 2-norm) "
             f"against tfaca in float64 at rtol = atol = {REF_TOL:g} stepping onto every knot "
             "(reference loss: "
             + ", ".join(f"{p} {meta['ref_loss'][p]:.6g}" for p in problems)
             + "); \"grads vs tfaca alike\": against tfaca in this run stepping alike "
             "(an entry onto the knots against `tfaca-knots`, any other against tfaca's "
             "default mode); \"path err\": each library's dX/dt at 397 times inside the "
             "pieces against a NumPy evaluation of the Hermite formula (relative 2-norm)")
    load = ("\"other load\": the largest fraction of the machine's CPU time that other "
            "processes used while the entry's children ran (/proc/stat; with one core "
            "given to the benchmark and the other busy, about 50%)")
    diag = ""
    if diag_libs:
        diag = f"""
## Diagnostics (not in the target)

{table(results, problems, diag_libs)}

{diagnostics(results, problems)}

{_bullet("`tfaca-closure` solves the same ODE with dX/dt evaluated inside func from the "
         "path it closes over: a closed-over tensor that no tape watches is not "
         "differentiated, so it is the step without the path's gradients (same steps, same "
         "loss and weight gradients). The default mode differentiates the path's "
         "coefficients (`solve(..., control=path)` passes them as func's arguments so that "
         "every gradient strategy reaches the path), as rows: each evaluation gathers one "
         "row of coefficients per series, and a replayed step adds the gradient into those "
         "rows alone (`tf.IndexedSlices`), never a dense tensor of every piece per "
         "evaluation.")}
{_bullet("`torchcde-dpweights` gives torchdiffeq's Dopri5 tfaca's default embedded error "
         "estimate (b_sol less Dormand and Prince's own 4th-order weights, as SciPy's RK45, "
         "MATLAB's ode45 and TorchDiffEqPack; torchdiffeq and diffrax use Shampine's, "
         "tfaca's `Dopri5(error_estimate='shampine')`). All three libraries let no "
         "accepted step shrink the next.")}
"""
    md = f"""# Neural CDE training step: tfaca, torchcde, diffrax

Generated by `{meta['command']}` on {meta['date']} in {meta['total_s'] / 60:.1f} min.

- Machine: {_cpu()}; CPU only, float32, Python {platform.python_version()}.
{_bullet(machine + ".")}
- Versions: {ver}.{(' Not installed: ' + ', '.join(missing) + '.') if missing else ''}
{_bullet("Problem: " + _problem_text() + ".")}
{_bullet(times + ".")}
{_bullet("Check: " + check + ".")}
{_bullet(load + ".")}

## Results

{table(results, problems, main_libs)}

## Target: tfaca's default mode at most {TARGET:g}x the faster peer

{targets(results, problems)}

Notes:
{_bullet("tfaca, torchcde and diffrax all leave the Hermite path's knots (where its second "
         "derivative jumps) to the error control and choose their own steps (tfaca makes "
         "only the knots of linear and rectilinear paths, where dX/dt itself jumps, stops "
         "of its solves): that comparison is the target's. On the noisy data every library "
         "takes about one accepted step per observation interval and many rejections; on "
         "the smooth data far fewer steps. tfaca's default Dopri5 measures its error against "
         "Dormand and Prince's embedded solution, the peers against Shampine's "
         "(`tfaca-shampine`; Diagnostics).")}
{_bullet("The `-knots` entries step onto every observation time (tfaca: the observation "
         "times as output times with interpolate=False, the last kept; torchdiffeq's "
         "step_t; diffrax's step_ts): every library then solves nearly the same discrete "
         "problem, and losses and gradients agree with each other and with the float64 "
         "reference to about the tolerance. Choosing their own steps the losses and "
         "gradients are off by the discretisation error at rtol = atol = "
         f"{RTOL:g}, which the error control underestimates across the knots.")}
{_bullet("torchcde's own default is `adjoint=True` (torchdiffeq's odeint_adjoint, its "
         "reverse solve at the same tolerances and, by default, with the parameters' "
         "adjoint in the error norm); `adjoint=False` differentiates the forward solve's "
         "operations. The path coefficients of torchcde and diffrax are computed once, "
         "outside the step, as their documentation does; tfaca builds its HermitePath "
         "inside the step from the observations (a few elementwise operations).")}
{_bullet("diffrax: the vector field returns a lineax FunctionLinearOperator, the batched "
         "matrix-vector product `einsum('bhc,bc->bh')`, so that the batch shares one step "
         "size as in tfaca and torchcde (a `jax.vmap` over the batch would give each series "
         "steps of its own). Its f-evaluations come from separately compiled copies with a "
         "`jax.debug.callback` counter; with `RecursiveCheckpointAdjoint` the backward "
         "re-evaluates f from its checkpoints.")}
{diag}"""
    return md


def docs_section(results, meta):
    problems = meta["problems"]
    libs = [k for k in meta["libs"] if k not in DIAGNOSTICS]
    threads = (f", {_threads(meta['threads'])} per library on a {os.cpu_count()}-core "
               "machine" + (" with other work on the rest of it" if meta.get("note") else ""))
    intro = textwrap.fill(
        f"A neural-CDE training step (forward and the gradients of every weight) from "
        f"`{meta['command']}` on {meta['date']}{threads}: {_problem_text()}. Milliseconds "
        "per step, accepted/rejected steps and the relative error of the gradients against "
        "a float64 reference. Every library leaves the Hermite path's knots to the error "
        "control and chooses its own steps, the comparison the target is judged on; the "
        "`-knots` rows (tfaca's `ts=times, interpolate=False`, torchdiffeq's `step_t`, "
        "diffrax's `step_ts`) step onto every observation time. Method, evaluations, loss "
        "errors, diagnostics (the path's gradients, the step control), notes: "
        "[`benchmarks/cde_step.md`](benchmarks/cde_step.md).", 90)
    return (f"{intro}\n\n{summary_table(results, problems, libs)}\n\n"
            f"{targets(results, problems)}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="noisy data, tfaca, tfaca-xla, torchcde, diffrax, one round of 3")
    parser.add_argument("--repeats", type=int, help="timed steps per round (10; --quick 3)")
    parser.add_argument("--rounds", type=int, help="rounds of every entry (2; --quick 1)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed steps per child at most (60; --quick 15)")
    parser.add_argument("--problems", help=f"some of {','.join(PROBLEMS)}")
    parser.add_argument("--libs", help=f"some of {','.join(ALL)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--note", default="",
                        help="a line about the machine's other load, for the report")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", default=os.path.join(HERE, "cde_step.md"))
    parser.add_argument("--json", default=os.path.join(CACHE, "cde_step_results.json"))
    parser.add_argument("--cache", default=CACHE, help="where the float64 references go")
    parser.add_argument("--no-docs", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.repeats is None:
        a.repeats = 3 if a.quick else 10
    if a.rounds is None:
        a.rounds = 1 if a.quick else 2
    if a.budget is None:
        a.budget = 15.0 if a.quick else 60.0
    if a.problems is None:
        a.problems = "noisy" if a.quick else ",".join(PROBLEMS)
    if a.libs is None:
        a.libs = ",".join(QUICK_LIBS if a.quick else ALL)
    if a.child:
        child_main(a)
        return None
    if a.render_only:
        with open(a.json) as fh:
            saved = json.load(fh)
        results, meta = saved["results"], saved["meta"]
    else:
        results, meta = run(a)
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(dict(results=results, meta=meta), fh)
    from run import replace_section, write_report

    write_report(a.out, render(results, meta))
    if not a.no_docs:
        replace_section(os.path.join(ROOT, "BENCHMARKS.md"), docs_section(results, meta),
                        "cde-step", "## Neural CDE training step")
    return results


if __name__ == "__main__":
    main()
