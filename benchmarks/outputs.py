"""Forward+backward time against the number of output times (issue 10) and against
max_steps (issue 26); writes outputs.md.

    python benchmarks/outputs.py [--quick] [--counts 2,20,200,1000] [--max-steps 128,1000,4096]
                                 [--libs ...] [--reps N] [--rounds R] [--python PYTHON]
                                 [--tfaca-root DIR] [--baseline-root DIR] [--json PATH]
                                 [--out PATH] [--render-only] [--no-docs]

Run it with an interpreter that has the peers (`pip install -e ".[bench]"`, see
benchmarks/README.md). One problem, from issue 10: an MLP vector field
dy/dt = W2 tanh(W1 y + b1) + b2 (state 32, hidden 128, batch 64, float32, seeded weights),
Dopri5 at rtol=1e-5, atol=1e-6, t in [0, 2], with 2, 20, 200 or 1000 output times equally
spaced in [0, 2] (ts[0] = 0 is the start). Loss: sum(ys**2) / 2 over every output;
forward+backward = the loss and its gradients with respect to y0 and the four weights.

max_steps axis (issue 26): tfaca in its default mode (`tfaca`: a plain tf.function, where
tfaca.solve's jit_compile="auto" compiles its own loops) and under XLA (`tfaca-xla`:
tf.function(jit_compile=True)), and diffrax with diffeqsolve(max_steps=...), run at every
--max-steps value (default 128, 1,000, 4,096); every other library/mode runs at the
smallest, which is also the max_steps of the per-count table and of issue 10's targets
(issue 10's runs used 100). The report judges issue 26's targets per tfaca mode: 20
outputs at max_steps 4,096 within 1.25x of max_steps 128; at 4,096, 1,000 outputs within
3x of 2; at 4,096, tfaca at most 1.0x diffrax at every count.

Every (library, mode, output count, max_steps) is measured in a child process of its own
(this file with --child), as benchmarks/run.py does; the whole set runs --rounds times,
the second round in reverse order, and each entry's time is the median over all rounds'
repetitions (this 2-core VM drifts by more than 30 % between minutes). The VM is shared,
so a child during which other processes used over 15 % of the CPU is measured again once
the machine is quiet. Outputs and gradients are checked against a float64 reference (SciPy
DOP853 at rtol=atol=1e-12 for y, and the adjoint equations solved backwards from it for the
gradients; cached in benchmarks/.cache/), so that a fast but wrong entry is flagged.

Writes --out (default benchmarks/outputs.md), and replaces the text between
`<!-- outputs-table:start -->` and `<!-- outputs-table:end -->` in BENCHMARKS.md (adding
an "Output times" section at its end when the markers are missing, as they are after
benchmarks/run.py rewrites that file) and in docs/speed.md (where the markers must
exist); --no-docs leaves those two alone.
Times on 2 cores: a child costs ~7 s (diffrax) to ~20 s (tfaca under XLA), nearly all
of it start-up and compilation: the repetitions (~1 s even at 4,096 max_steps) are not
where the time goes, so they stay at issue 10's 5 per round and the axis costs children.
The full run of every library (56 entries x 2 rounds, against issue 10's 32 x 2 in ~12
minutes) takes ~25 minutes, `--libs tfaca-xla,tfaca,diffrax` (36 entries) ~15, each
tfaca mode added by --baseline-root ~6 more (estimates from the per-child times of a
--quick run; plus ~2 minutes for the references the first time). --quick (counts 2, 20
and 1000, max_steps 128 and 4096, one round of 3 repetitions; 18 entries for those three
libraries) ~4 minutes on a quiet machine, 9 measured with other processes using ~70 % of
the CPU.
--tfaca-root DIR measures the tfaca/ of another checkout (e.g. a `git worktree` of a
commit while the work tree changes); --baseline-root DIR measures a second checkout's
tfaca/ in the same run, its tfaca and tfaca-xla entries interleaved with the first's (rows
"tfaca (baseline)"), so that both see the same machine; --render-only re-writes every
report from --json.
"""

import argparse
import datetime
import hashlib
import inspect
import json
import os
import platform
import resource
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

STATE, HIDDEN, BATCH = 32, 128, 64
T1 = 2.0
RTOL, ATOL = 1e-5, 1e-6
COUNTS = [2, 20, 200, 1000]
SEED = 10
# W2 = W1^T S + noise with S = ROTATION * (skew - 0.1 I), as problems.py's MLP: a weakly
# damped rotation, so the trajectory stays bounded and bends between outputs. 0.5 gives
# 12-13 accepted Dopri5 steps in every library (issue 10 measured 13 for diffrax); larger
# values take more (SciPy's RK45: 0.5: 12, 0.6: 14, 0.8: 19).
ROTATION = 0.5
# Trial-step bound for tfaca and diffrax alike: it sizes tfaca's XLA buffers and diffrax's
# checkpoint count. Issue 26 measures the cost of raising it: the libraries in AXIS_LIBS
# run at every value of MAX_STEPS_AXIS (--max-steps); every other entry, the per-count
# table and issue 10's targets use the smallest value, near the need (~13 accepted steps;
# issue 10's runs used 100). With interpolate=False tfaca steps onto every output:
# count - 1 more.
MAX_STEPS_AXIS = [128, 1000, 4096]
MAX_STEPS = MAX_STEPS_AXIS[0]
AXIS_LIBS = ("tfaca-xla", "tfaca", "diffrax")
# Issue 26's targets: (count, max_steps) pairs and bounds on forward+backward time ratios.
T26_LOW, T26_HIGH = 128, 4096        # max_steps
T26_STEPS_COUNT, T26_STEPS_MAX = 20, 1.25    # 20 outputs: time at 4096 / at 128
T26_FEW, T26_MANY, T26_COUNT_MAX = 2, 1000, 3.0  # at 4096: time at 1000 outputs / at 2
T26_DIFFRAX_MAX = 1.0                # at 4096, every count: tfaca / diffrax
# An entry is flagged WRONG when its relative 2-norm error (over all outputs, or over each
# gradient) exceeds this: 100 x rtol, well above what an honest float32 Dopri5 solve at
# rtol=1e-5 reaches here (~1e-5), well below a wrong interpolation (linear: ~1e-2).
MAX_REL_ERROR = 1e-3
# A child during which other processes used more than this fraction of the CPU is
# measured again once the machine is quiet (up to three attempts, the least loaded kept).
MAX_OTHER_LOAD = 0.15


def make():
    """y0 (BATCH, STATE) and [W1, b1, W2, b2] in TF layout (y @ W1), all float32."""
    rng = np.random.default_rng(SEED)
    d, h = STATE, HIDDEN
    y0 = rng.standard_normal((BATCH, d))
    w1 = rng.standard_normal((d, h)) / np.sqrt(d)
    b1 = rng.standard_normal(h) * 0.1
    a = rng.standard_normal((d, d)) / np.sqrt(2 * d)
    rotation = ROTATION * ((a - a.T) - 0.1 * np.eye(d))
    w2 = w1.T @ rotation + rng.standard_normal((h, d)) / np.sqrt(h)
    b2 = rng.standard_normal(d) * 0.1
    return y0.astype(np.float32), [w.astype(np.float32) for w in (w1, b1, w2, b2)]


def output_times(n):
    """n equally spaced float32 times in [0, T1]; every library gets these exact values."""
    return np.linspace(0.0, T1, n).astype(np.float32)


def steps_bound(n, interpolate, max_steps=MAX_STEPS):
    """tfaca's max_steps: `max_steps`, plus count - 1 when it steps onto every output."""
    return max_steps if interpolate else n - 1 + max_steps


# ----------------------------------------------------------------------------- reference

def _vf64(y, w):
    w1, b1, w2, b2 = w
    return np.tanh(y @ w1 + b1) @ w2 + b2


def reference(n):
    """float64 outputs and gradients of loss = sum(ys**2)/2 at output_times(n).

    y: SciPy DOP853 at rtol=atol=1e-12 with its dense output. Gradients: the adjoint
    equations da/dt = -a df/dy, dg/dt = -a df/dw solved backwards between consecutive
    output times (rtol=atol=1e-10), a jumping by y(t_i) at each output time, y(t) from
    the forward dense output.
    """
    from scipy.integrate import solve_ivp

    y0, w = make()
    y0 = y0.astype(np.float64)
    w = [x.astype(np.float64) for x in w]
    w1, b1, w2, b2 = w
    ts = output_times(n).astype(np.float64)
    shape = y0.shape
    fwd = solve_ivp(lambda t, y: _vf64(y.reshape(shape), w).ravel(), (0.0, ts[-1]), y0.ravel(),
                    method="DOP853", rtol=1e-12, atol=1e-12, dense_output=True)
    assert fwd.success, fwd.message
    ys = np.stack([y0] + [fwd.sol(t).reshape(shape) for t in ts[1:]])

    sizes = [y0.size] + [x.size for x in w]

    def adjoint_rhs(t, z):
        a = z[:y0.size].reshape(shape)
        y = fwd.sol(t).reshape(shape)
        u = np.tanh(y @ w1 + b1)
        g_z = (a @ w2.T) * (1 - u * u)
        parts = [g_z @ w1.T, y.T @ g_z, g_z.sum(0), u.T @ a, a.sum(0)]
        return -np.concatenate([p.ravel() for p in parts])

    z = np.zeros(sum(sizes))
    for i in range(n - 1, 0, -1):
        z[:y0.size] += ys[i].ravel()
        seg = solve_ivp(adjoint_rhs, (ts[i], ts[i - 1]), z, method="DOP853", rtol=1e-10,
                        atol=1e-10)
        assert seg.success, seg.message
        z = seg.y[:, -1]
    z[:y0.size] += ys[0].ravel()
    grads, k = [], 0
    for s, like in zip(sizes, [y0] + w):
        grads.append(z[k:k + s].reshape(like.shape))
        k += s
    return ys, grads


def _ref_path(n):
    h = hashlib.sha256()
    y0, w = make()
    for x in [y0, output_times(n)] + w:
        h.update(x.tobytes())
    h.update(repr((RTOL, ATOL, "dop853-1e-12-adjoint-1e-10")).encode())
    d = os.path.join(HERE, ".cache")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"outputs_ref_{n}_{h.hexdigest()[:12]}.npz")


def load_reference(n):
    path = _ref_path(n)
    if not os.path.exists(path):
        ys, grads = reference(n)
        np.savez(path, ys=ys, *grads)
    ref = np.load(path)
    return ref["ys"], [ref[f"arr_{i}"] for i in range(5)]


def _rel(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------- runners
# Each runner: fwd() -> ys; fwdbwd() -> (ys, [dL/dy0, dL/dW1, dL/db1, dL/dW2, dL/db2]);
# steps() -> (accepted, rejected) of the last fwdbwd, None where the library does not tell;
# `note` for the table. Frameworks are imported in the child only.

def tfaca_has_interpolate():
    import tfaca
    return "interpolate" in inspect.signature(tfaca.solve).parameters


class TfacaRunner:
    """tfaca.solve, ACA gradient, in tf.function (optionally jit_compile=True) or eager."""

    def __init__(self, n, compile="xla", interpolate=True, max_steps=MAX_STEPS):
        import tensorflow as tf

        import tfaca

        y0, w = make()
        self.y0 = tf.constant(y0)
        self.ws = [tf.Variable(x) for x in w]
        ts = tf.constant(output_times(n))
        kw = dict(method="dopri5", rtol=RTOL, atol=ATOL,
                  max_steps=steps_bound(n, interpolate, max_steps))
        if tfaca_has_interpolate():
            kw["interpolate"] = interpolate
        elif interpolate:
            interpolate = False  # today's tfaca: it steps onto every output
            kw["max_steps"] = steps_bound(n, False, max_steps)
        self.note = (f"interpolate={interpolate}" if "interpolate" in kw
                     else "steps onto every output (no `interpolate` yet)")
        self.note += f", max_steps={kw['max_steps']}"
        w1, b1, w2, b2 = self.ws

        def func(t, y):
            return tf.tanh(y @ w1 + b1) @ w2 + b2

        def solve(y0):
            return tfaca.solve(func, y0, ts, **kw)

        def fwd(y0):
            return solve(y0).ys

        def fwdbwd(y0):
            with tf.GradientTape() as tape:
                tape.watch(y0)
                sol = solve(y0)
                # tf.square, as a TensorFlow user writes it: outside XLA the gradient of
                # `ys**2` runs TensorFlow's Pow kernel on every element (11 ms at 1,000
                # outputs here), where JAX and torch turn `**2` into a multiply.
                loss = 0.5 * tf.reduce_sum(tf.square(sol.ys))
            grads = tape.gradient(loss, [y0] + self.ws)
            return sol.ys, grads, sol.stats.num_steps, sol.stats.num_rejected

        if compile != "eager":
            fwd = tf.function(fwd, jit_compile=compile == "xla")
            fwdbwd = tf.function(fwdbwd, jit_compile=compile == "xla")
        self._fwd, self._fwdbwd = fwd, fwdbwd
        self._steps = None

    def fwd(self):
        return self._fwd(self.y0).numpy()

    def fwdbwd(self):
        ys, grads, acc, rej = self._fwdbwd(self.y0)
        self._steps = (int(acc), int(rej))
        return ys.numpy(), [g.numpy() for g in grads]

    def steps(self):
        return self._steps


class DiffraxRunner:
    """diffrax Dopri5, PIDController(rtol, atol), SaveAt(ts=...), RecursiveCheckpointAdjoint,
    jax.jit."""

    def __init__(self, n, max_steps=MAX_STEPS):
        import diffrax
        import jax
        import jax.numpy as jnp

        self.jax = jax
        y0, w = make()
        self.y0 = jnp.asarray(y0)
        self.ws = [jnp.asarray(x) for x in w]
        ts = jnp.asarray(output_times(n))
        self.note = f"max_steps={max_steps}"

        def vf(t, y, w):
            return jnp.tanh(y @ w[0] + w[1]) @ w[2] + w[3]

        def solve(y0, ws):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vf), diffrax.Dopri5(), 0.0, T1, None, y0, args=ws,
                stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                saveat=diffrax.SaveAt(ts=ts), adjoint=diffrax.RecursiveCheckpointAdjoint(),
                max_steps=max_steps)
            return sol.ys, sol.stats

        def loss(y0, ws):
            ys, stats = solve(y0, ws)
            return 0.5 * jnp.sum(ys**2), (ys, stats)

        self._fwd = jax.jit(lambda y0, ws: solve(y0, ws)[0])
        self._fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        self._steps = None

    def fwd(self):
        return np.asarray(self._fwd(self.y0, self.ws).block_until_ready())

    def fwdbwd(self):
        (g_y0, g_w), (ys, stats) = self._fwdbwd(self.y0, self.ws)
        self.jax.block_until_ready((g_y0, g_w, ys))
        self._steps = (int(stats["num_accepted_steps"]), int(stats["num_rejected_steps"]))
        return np.asarray(ys), [np.asarray(g_y0)] + [np.asarray(g) for g in g_w]

    def steps(self):
        return self._steps


def _torch_field(torch, w):
    """The same formula with the same TF-layout weights: tanh(y @ W1 + b1) @ W2 + b2."""

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(x)) for x in w])

        def forward(self, t, y):
            w1, b1, w2, b2 = self.params
            return torch.tanh(y @ w1 + b1) @ w2 + b2

    return Field()


class _TorchRunner:
    """Forward and forward+backward of a torch solve `self._solve(y0)`, loss sum(ys**2)/2,
    gradients with respect to y0 and the field's parameters."""

    def fwd(self):
        with self.torch.no_grad():
            return self._solve(self.y0).numpy()

    def fwdbwd(self):
        y0 = self.y0.clone().requires_grad_(True)
        ys = self._solve(y0)
        loss = 0.5 * (ys**2).sum()
        grads = self.torch.autograd.grad(loss, [y0] + list(self.func.params))
        return ys.detach().numpy(), [g.numpy() for g in grads]


class TorchdiffeqRunner(_TorchRunner):
    """torchdiffeq.odeint (backprop through the solver), dopri5, the given t."""

    def __init__(self, n):
        import torch
        import torchdiffeq
        from torchdiffeq._impl import rk_common

        self.torch = torch
        y0, w = make()
        self.y0 = torch.tensor(y0)
        self.func = _torch_field(torch, w)
        ts = torch.tensor(output_times(n))
        self._solve = lambda y0: torchdiffeq.odeint(self.func, y0, ts, rtol=RTOL, atol=ATOL,
                                                    method="dopri5")
        self._solver_class = rk_common.RKAdaptiveStepsizeODESolver
        self.note = ""
        self._steps = None

    def steps(self):
        # torchdiffeq does not report steps: count its _adaptive_step calls in one extra
        # solve (a call that leaves t1 unchanged was a rejected trial).
        cls = self._solver_class
        plain = cls._adaptive_step
        tally = [0, 0]

        def counted(solver, state):
            new = plain(solver, state)
            tally[0 if bool(new.t1 != state.t1) else 1] += 1
            return new

        cls._adaptive_step = counted
        try:
            self.fwd()
        finally:
            cls._adaptive_step = plain
        return tuple(tally)


class TdepRunner(_TorchRunner):
    """TorchDiffEqPack odesolve (its ACA: trial steps without a graph, accepted steps
    re-run with one), dopri5, t_eval = the output times."""

    def __init__(self, n, interpolation="cubic"):
        import torch
        from TorchDiffEqPack import odesolve

        self.torch = torch
        y0, w = make()
        self.y0 = torch.tensor(y0)
        self.func = _torch_field(torch, w)
        ts = output_times(n)
        self.options = {"method": "dopri5", "h": None, "t0": 0.0, "t1": T1, "rtol": RTOL,
                        "atol": ATOL, "print_neval": False, "neval_max": 500000,
                        "t_eval": ts.astype(np.float64).tolist(), "regenerate_graph": False,
                        "interpolation_method": interpolation}
        self._odesolve = odesolve
        self.note = f"interpolation_method={interpolation!r}"
        self._steps = None

    def _solve(self, y0):
        solver = self._odesolve(self.func, y0, self.options, return_solver=True)
        trials = [0]
        plain = solver.step

        def counted(*args, **kwargs):
            if not self.torch.is_grad_enabled():  # the search for the step size
                trials[0] += 1
            return plain(*args, **kwargs)

        solver.step = counted
        ys = solver.integrate(y0=y0, t0=self.options["t0"], t_eval=self.options["t_eval"])
        # neval: accepted steps (one per pass of the outer loop).
        self._steps = (solver.neval, trials[0] - solver.neval)
        return ys

    def steps(self):
        return self._steps


class TfpRunner:
    """tfp.math.ode.DormandPrince with solution_times, its default (adjoint) gradient,
    in tf.function. Controller bounds as everyone else's (min factor 0.2, its default is
    0.1); it keeps its fixed first step 1e-3 (it has no automatic first step)."""

    def __init__(self, n, max_steps=MAX_STEPS):
        import tensorflow as tf
        import tensorflow_probability as tfp

        y0, w = make()
        self.y0 = tf.constant(y0)
        self.ws = [tf.constant(x) for x in w]
        ts = tf.constant(output_times(n))
        solver = tfp.math.ode.DormandPrince(
            rtol=RTOL, atol=ATOL, safety_factor=0.9, min_step_size_factor=0.2,
            max_step_size_factor=10.0, max_num_steps=40 * max_steps)
        self.note = "accepted steps not exposed; forward f-evals shown"

        def func(t, y, w1, b1, w2, b2):
            return tf.tanh(y @ w1 + b1) @ w2 + b2

        def solve(y0, ws):
            res = solver.solve(func, 0.0, y0, solution_times=ts,
                               constants=dict(zip(["w1", "b1", "w2", "b2"], ws)))
            return res.states, res.diagnostics.num_ode_fn_evaluations

        @tf.function
        def fwdbwd(y0, ws):
            with tf.GradientTape() as tape:
                tape.watch([y0] + ws)
                ys, nfe = solve(y0, ws)
                loss = 0.5 * tf.reduce_sum(tf.square(ys))  # as for tfaca
            return ys, tape.gradient(loss, [y0] + ws), nfe

        self._fwd = tf.function(lambda y0, ws: solve(y0, ws)[0])
        self._fwdbwd = fwdbwd
        self._nfe = None

    def fwd(self):
        return self._fwd(self.y0, self.ws).numpy()

    def fwdbwd(self):
        ys, grads, nfe = self._fwdbwd(self.y0, self.ws)
        self._nfe = int(nfe)
        return ys.numpy(), [g.numpy() for g in grads]

    def steps(self):
        return None


# key: (library, mode, factory(n, max_steps), condition) -- condition "interpolate": only
# when tfaca has the `interpolate` keyword (the exact-landing row is then a separate entry).
# "tfaca" is tfaca's default mode: a plain tf.function around tfaca.solve, whose default
# jit_compile="auto" compiles its own loops.
LIBS = {
    "tfaca-xla": ("tfaca", "ACA, tf.function(jit_compile=True)",
                  lambda n, ms: TfacaRunner(n, "xla", True, ms), None),
    "tfaca": ("tfaca", "ACA, tf.function (default mode)",
              lambda n, ms: TfacaRunner(n, "function", True, ms), None),
    "tfaca-xla-land": ("tfaca", "ACA, tf.function(jit_compile=True), interpolate=False",
                       lambda n, ms: TfacaRunner(n, "xla", False, ms), "interpolate"),
    "diffrax": ("diffrax", "RecursiveCheckpointAdjoint, SaveAt(ts), jit",
                lambda n, ms: DiffraxRunner(n, ms), None),
    "torchdiffeq": ("torchdiffeq", "odeint (backprop)", lambda n, ms: TorchdiffeqRunner(n),
                    None),
    "tdep": ("TorchDiffEqPack", "odesolve (ACA), t_eval", lambda n, ms: TdepRunner(n), None),
    "tdep-poly": ("TorchDiffEqPack", "odesolve (ACA), t_eval, Dopri5 interpolant",
                  lambda n, ms: TdepRunner(n, "polynomial"), None),
    "tfp": ("TFP", "DormandPrince (adjoint), solution_times, tf.function",
            lambda n, ms: TfpRunner(n, ms), None),
}
ORDER = list(LIBS)
# --baseline-root DIR measures these modes of a second tfaca checkout too, as entries
# named LIB + BASELINE, interleaved with this checkout's.
BASELINE = "@baseline"
BASELINE_LIBS = ("tfaca-xla", "tfaca")


def _base_lib(lib):
    """The LIBS key of an entry name (a baseline entry's without its suffix)."""
    return lib.split("@")[0]


def _spec(lib):
    return LIBS[_base_lib(lib)]


def on_axis(lib):
    """Whether the library/mode is measured at every max_steps (else at the smallest)."""
    return _base_lib(lib) in AXIS_LIBS


def entries(libs, counts, axis):
    """(lib, count, max_steps) of one round, in order: count, then max_steps, then lib, so
    that the entries compared by the targets (same count and max_steps, other library)
    run one after another."""
    low = min(axis)
    return [(lib, n, ms) for n in counts for ms in axis for lib in libs
            if ms == low or on_axis(lib)]


# ----------------------------------------------------------------------------- the child

WARMUP = 5


def _times(fn, reps, budget):
    """Seconds of up to `reps` calls, fewer when one call is slow (about `budget` s)."""
    out = []
    while len(out) < reps and (not out or sum(out) < budget):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(lib, n, ms, reps, budget):
    """One (library, count, max_steps): warm-up, timed repetitions, steps, errors. A dict
    for JSON."""
    out = dict(lib=lib, n=n, max_steps=ms)
    t0 = time.perf_counter()
    runner = _spec(lib)[2](n, ms)
    out["note"] = runner.note
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ys, grads = runner.fwdbwd()
    out["first_fwdbwd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.fwd()
    out["first_fwd_s"] = time.perf_counter() - t0
    # Warm-up, not timed, the same for every library: XLA's first calls on CPU run slow
    # (the second still ran ~30 % slow; on 2026-12-06, after two warm-up calls, five
    # repetitions gave tfaca-xla 11.2 ms at 2 outputs, where 25 repetitions in a loop of
    # their own gave 7.7 ms at their 20th percentile).
    for _ in range(WARMUP):
        runner.fwdbwd()
        runner.fwd()
    # Alternate forward and forward+backward, so that a slow minute hits both alike.
    out["fwd_times"], out["fwdbwd_times"] = [], []
    deadline = time.perf_counter() + 2 * budget
    while len(out["fwdbwd_times"]) < reps:
        out["fwd_times"] += _times(runner.fwd, 1, budget)
        out["fwdbwd_times"] += _times(runner.fwdbwd, 1, budget)
        if time.perf_counter() > deadline:
            break
    steps = runner.steps()
    out["steps"], out["rejected"] = steps if steps else (None, None)
    if isinstance(runner, TfpRunner):
        out["nfe_fwd"] = runner._nfe
    ref_ys, ref_g = load_reference(n)
    out["err_y"] = _rel(ys, ref_ys)
    out["err_grad_y0"] = _rel(grads[0], ref_g[0])
    out["err_grad_w"] = _rel(np.concatenate([g.ravel() for g in grads[1:]]),
                             np.concatenate([g.ravel() for g in ref_g[1:]]))
    out["finite"] = bool(np.all(np.isfinite(ys)) and all(np.all(np.isfinite(g)) for g in grads))
    return out


def child_main(lib, n, ms, reps, budget):
    try:
        out = measure(lib, n, ms, reps, budget)
    except Exception as e:  # reported in the table, never hidden
        msg = " ".join(x.strip() for x in str(e).splitlines() if x.strip())
        out = dict(lib=lib, n=n, max_steps=ms, error=f"{type(e).__name__}: {msg[:300]}",
                   traceback=traceback.format_exc()[-3000:])
    print("@@RESULT@@" + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent

def _child_env(tfaca_root):
    from run import BASE_ENV

    env = dict(os.environ)
    env.update(BASE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([tfaca_root, HERE, env.get("PYTHONPATH", "")])
    return env


def _busy_seconds():
    """CPU seconds the whole machine has been busy (/proc/stat; steal time included)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _wait_quiet(limit=0.05, timeout=600.0):
    """Waits until other processes use less than `limit` of the machine over 5 s."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        b0 = _busy_seconds()
        time.sleep(5.0)
        if (_busy_seconds() - b0) / (5.0 * os.cpu_count()) < limit:
            return


def _run_child(python, args, tfaca_root, timeout):
    """Runs one child; its result gains `other_load`: the fraction of the machine's CPU
    time that other processes used while it ran (this VM is shared)."""
    b0, c0, w0 = _busy_seconds(), _children_seconds(), time.perf_counter()
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--child"] + args,
                              env=_child_env(tfaca_root), cwd=HERE, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    other = (_busy_seconds() - b0) - (_children_seconds() - c0)
    other_load = max(other, 0.0) / ((time.perf_counter() - w0) * os.cpu_count())
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@@RESULT@@"):
            return dict(json.loads(line[len("@@RESULT@@"):]), other_load=other_load)
    return dict(error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])


def _measure(python, args, tfaca_root, attempts=3):
    """A child's result; measured again (after waiting for a quiet machine, at most
    `attempts` times) while other processes used over 15 % of the CPU during it. The
    attempt with the least other load is kept."""
    best = None
    for attempt in range(max(attempts, 1)):
        r = _run_child(python, args, tfaca_root, 1800)
        if "error" in r:
            return r
        if best is None or r["other_load"] < best["other_load"]:
            best = r
        if best["other_load"] <= MAX_OTHER_LOAD or attempt + 1 >= attempts:
            break
        print(f"  {' '.join(args[:3])}: other processes used {r['other_load']:.0%} of the "
              f"CPU; measuring again once the machine is quiet", flush=True)
        _wait_quiet()
    return best


def _probe(python, tfaca_root):
    """Whether the children's tfaca has `interpolate`, and which tfaca they import."""
    code = ("import inspect, json, tfaca; print(json.dumps(dict(path=tfaca.__file__, "
            "interpolate='interpolate' in inspect.signature(tfaca.solve).parameters)))")
    # cwd=HERE: `python -c` puts the working directory first on sys.path, and a checkout's
    # root there would shadow --tfaca-root.
    r = subprocess.run([python, "-c", code], env=_child_env(tfaca_root), cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tfaca_commit(tfaca_root):
    """HEAD of the tfaca checkout, and whether its tfaca/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", tfaca_root, "log", "-1", "--format=commit %h (%cs)"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", tfaca_root, "status", "--porcelain", "tfaca"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + (", tfaca/ with uncommitted changes" if dirty else "")


# ----------------------------------------------------------------------------- the report

def _median_ms(xs):
    return None if not xs else 1e3 * float(np.median(xs))


def _ms(x):
    return "n/a" if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _sci(x):
    return "n/a" if x is None else f"{x:.1e}"


def _ok(r):
    return (r.get("finite", False)
            and max(r["err_y"], r["err_grad_y0"], r["err_grad_w"]) <= MAX_REL_ERROR)


def _steps_cell(r):
    if r.get("steps") is not None:
        return f"{r['steps']}/{r['rejected']}"
    if r.get("nfe_fwd") is not None:
        return f"n/a ({r['nfe_fwd']} f-evals)"
    return "n/a"


def _merge(rounds):
    """One entry per (lib, n, max_steps): the first round's fields, every round's times
    pooled."""
    merged = {}
    for results in rounds:
        for key, r in results.items():
            if key not in merged or "error" in merged[key]:
                merged[key] = dict(r)
                continue
            if "error" in r:
                merged[key].setdefault("round_errors", []).append(r["error"])
                continue
            for k in ("fwd_times", "fwdbwd_times"):
                merged[key][k] = merged[key][k] + r[k]
            merged[key]["other_load"] = max(merged[key].get("other_load", 0.0),
                                            r.get("other_load", 0.0))
    for r in merged.values():
        if "error" not in r:
            r["fwd_ms"] = _median_ms(r["fwd_times"])
            r["fwdbwd_ms"] = _median_ms(r["fwdbwd_times"])
            r["compile_s"] = max(r["first_fwdbwd_s"] - r["fwdbwd_ms"] / 1e3, 0.0)
    return merged


def _get(results, lib, n, ms):
    r = results.get((lib, n, ms))
    return None if r is None or "error" in r else r


def _missing(results, lib, n, ms):
    """Why (lib, n, ms) has no time: not measured, or failed."""
    r = results.get((lib, n, ms))
    name = _spec(lib)[0] + (" (baseline)" if lib.endswith(BASELINE) else "")
    what = f"{name} at {n} outputs, max_steps {ms}"
    return f"{what} not measured" if r is None else f"{what} failed"


def _short(lib):
    """'library mode' for the target lines."""
    name, mode = _spec(lib)[:2]
    return f"{name}{' (baseline)' if lib.endswith(BASELINE) else ''} {mode}"


def _label(lib, meta):
    """(library, mode) cells of the tables: a tfaca mode states whether its `interpolate`
    keyword existed (today's tfaca steps onto every output without it)."""
    name, mode = _spec(lib)[:2]
    interpolate = meta.get("interpolate", True)
    if lib.endswith(BASELINE):
        name += " (baseline)"
        interpolate = meta.get("baseline_interpolate", interpolate)
    if _base_lib(lib) in ("tfaca-xla", "tfaca"):
        mode += ", interpolate=True" if interpolate else " (steps onto every output)"
    return name, mode


def _cell(r):
    """fwd+bwd ms (accepted steps), 'failed', or '' when not measured."""
    if r is None:
        return ""
    if "error" in r:
        return "failed"
    steps = f" ({r['steps']})" if r.get("steps") is not None else ""
    return f"{_ms(r['fwdbwd_ms'])}{steps}" + ("" if _ok(r) else " WRONG")


def full_table(results, libs, counts, axis, meta):
    lines = ["| library | mode | outputs | max_steps | steps acc/rej | fwd ms | fwd+bwd ms | "
             "reps | compile s | rel err ys | rel err dL/dy0 | rel err dL/dθ | check | "
             "other load | notes |", "|" + "---|" * 15]
    for lib in libs:
        name, mode = _label(lib, meta)
        for ms in axis:
            for n in counts:
                r = results.get((lib, n, ms))
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {name} | {mode} | {n} | {ms} | FAILED: {r['error'][:200]} |"
                                 + " |" * 10)
                    continue
                lines.append(
                    f"| {name} | {mode} | {n} | {ms} | {_steps_cell(r)} | {_ms(r['fwd_ms'])} | "
                    f"{_ms(r['fwdbwd_ms'])} | {len(r['fwdbwd_times'])} | {r['compile_s']:.1f} | "
                    f"{_sci(r['err_y'])} | {_sci(r['err_grad_y0'])} | {_sci(r['err_grad_w'])} | "
                    f"{'ok' if _ok(r) else 'WRONG'} | {r.get('other_load', 0.0):.0%} | "
                    f"{r['note']} |")
    return "\n".join(lines)


def summary_table(results, libs, counts, ms, meta):
    """fwd+bwd ms (accepted steps) per library and count at max_steps `ms`; WRONG marks a
    failed check."""
    head = "| library | mode | " + " | ".join(f"{n} outputs" for n in counts) + " |"
    lines = [head, "|---|---|" + "---|" * len(counts)]
    for lib in libs:
        name, mode = _label(lib, meta)
        cells = [_cell(results.get((lib, n, ms))) for n in counts]
        if any(cells):
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def max_steps_table(results, libs, counts, axis, meta):
    """fwd+bwd ms (accepted steps): a row per library/mode on the max_steps axis and
    max_steps, a column per count."""
    head = "| library | mode | max_steps | " + " | ".join(f"{n} outputs" for n in counts) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(counts)]
    for lib in libs:
        if not on_axis(lib):
            continue
        name, mode = _label(lib, meta)
        for ms in axis:
            cells = [_cell(results.get((lib, n, ms))) for n in counts]
            if any(cells):
                lines.append(f"| {name} | {mode} | {ms:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results, counts, ms):
    """Issue 10's two targets (at max_steps `ms`) as PASS/FAIL lines, and the same ratios
    for plain tf.function as info lines. A tfaca entry that fails the accuracy check
    fails."""
    judged, info = [], []
    lo, hi = min(counts), max(counts)
    for lib in ("tfaca-xla", "tfaca"):
        a, b = _get(results, lib, lo, ms), _get(results, lib, hi, ms)
        what = f"tfaca {LIBS[lib][1]}, time at {hi} outputs / at {lo}"
        if a and b:
            v = b["fwdbwd_ms"] / a["fwdbwd_ms"]
            txt = f"{_ms(b['fwdbwd_ms'])} / {_ms(a['fwdbwd_ms'])} ms = {v:.2f}"
            ok = v <= 1.5 and _ok(a) and _ok(b)
        else:
            txt, ok = "n/a (missing result)", False
        if lib == "tfaca-xla":
            judged.append(f"- {'PASS' if ok else 'FAIL'}: {what}: {txt} (target ≤ 1.5)")
        else:
            info.append(f"- info: {what}: {txt} (not judged)")
    per_count = []
    for n in counts:
        a, d = _get(results, "tfaca-xla", n, ms), _get(results, "diffrax", n, ms)
        if a and d:
            v = a["fwdbwd_ms"] / d["fwdbwd_ms"]
            ok = v <= 0.7 and _ok(a)
            per_count.append(f"{n}: {_ms(a['fwdbwd_ms'])} / {_ms(d['fwdbwd_ms'])} ms = {v:.2f}"
                             + ("" if ok else " FAIL"))
        else:
            ok = False
            per_count.append(f"{n}: n/a (missing result) FAIL")
        b = _get(results, "tfaca", n, ms)
        if b and d:
            info.append(f"- info: tfaca {LIBS['tfaca'][1]} / diffrax at {n} outputs: "
                        f"{_ms(b['fwdbwd_ms'])} / {_ms(d['fwdbwd_ms'])} ms = "
                        f"{b['fwdbwd_ms'] / d['fwdbwd_ms']:.2f} (not judged)")
    for lib in ("tfaca-xla", "tfaca", "diffrax"):
        a, b = _get(results, lib, lo, ms), _get(results, lib, hi, ms)
        if a and b:
            fwd = b["fwd_ms"] - a["fwd_ms"]
            bwd = (b["fwdbwd_ms"] - b["fwd_ms"]) - (a["fwdbwd_ms"] - a["fwd_ms"])
            info.append(f"- info: {' '.join(LIBS[lib][:2])}, from {lo} to {hi} outputs: "
                        f"forward {fwd:+.1f} ms, backward (fwd+bwd − fwd) {bwd:+.1f} ms")
    all_ok = all(not x.endswith("FAIL") for x in per_count)
    judged.append(f"- {'PASS' if all_ok else 'FAIL'}: tfaca {LIBS['tfaca-xla'][1]} / diffrax "
                  f"at every count (target ≤ 0.7): " + "; ".join(per_count))
    return "\n".join(judged), "\n".join(info)


def _ratio(results, num, den, bound, own):
    """(met, text) for the fwd+bwd time ratio of entries num / den, each (lib, n, ms):
    met when the ratio is at most `bound` and the entries of `own` (the tfaca library
    judged) pass the accuracy check; a missing or failed entry is a miss."""
    a, b = _get(results, *num), _get(results, *den)
    if a is None or b is None:
        return False, "n/a (" + "; ".join(_missing(results, *k) for k, r in ((num, a), (den, b))
                                          if r is None) + ")"
    v = a["fwdbwd_ms"] / b["fwdbwd_ms"]
    wrong = [f"{k[1]} outputs at max_steps {k[2]} WRONG" for k, r in ((num, a), (den, b))
             if k[0] == own and not _ok(r)]
    text = f"{_ms(a['fwdbwd_ms'])} / {_ms(b['fwdbwd_ms'])} ms = {v:.2f}"
    if wrong:
        text += " (" + ", ".join(wrong) + ")"
    return v <= bound and not wrong, text


def _bound(x):
    return f"{x:.2f}" if round(x * 10) != x * 10 else f"{x:.1f}"


def targets_26(results, libs, counts):
    """Issue 26's three targets for every tfaca mode in `libs` that is on the max_steps
    axis (this checkout's and the baseline's), one 'met' / 'missed' line each:

    - 20 outputs: time at max_steps 4096 within 1.25x of max_steps 128;
    - max_steps 4096: time at 1000 outputs within 3x of 2 outputs;
    - max_steps 4096: tfaca at most 1.0x diffrax at every count in `counts`.

    A ratio counts only from entries that ran and whose tfaca side passed the accuracy
    check; anything else is a miss, never a pass. Returns (lines, {(lib, target): met})
    with target in ("max_steps", "outputs", "diffrax")."""
    lines, verdicts = [], {}

    def line(lib, target, met, what, text, bound):
        verdicts[(lib, target)] = met
        lines.append(f"- {'met' if met else 'missed'}: {_short(lib)}: {what}: {text} "
                     f"(target ≤ {_bound(bound)})")

    hi, lo = T26_HIGH, T26_LOW
    for lib in libs:
        if _base_lib(lib) not in ("tfaca-xla", "tfaca"):
            continue
        n = T26_STEPS_COUNT
        met, text = _ratio(results, (lib, n, hi), (lib, n, lo), T26_STEPS_MAX, lib)
        line(lib, "max_steps", met, f"{n} outputs, time at max_steps {hi} / at {lo}", text,
             T26_STEPS_MAX)
        met, text = _ratio(results, (lib, T26_MANY, hi), (lib, T26_FEW, hi), T26_COUNT_MAX, lib)
        line(lib, "outputs", met, f"max_steps {hi}, time at {T26_MANY} outputs / at {T26_FEW}",
             text, T26_COUNT_MAX)
        parts, all_met = [], bool(counts)
        for n in counts:
            met, text = _ratio(results, (lib, n, hi), ("diffrax", n, hi), T26_DIFFRAX_MAX, lib)
            all_met = all_met and met
            parts.append(f"{n}: {text}" + ("" if met else " missed"))
        line(lib, "diffrax", all_met, f"time / diffrax at max_steps {hi}, every count",
             "; ".join(parts) or "no counts", T26_DIFFRAX_MAX)
    return "\n".join(lines), verdicts


def _g(x):
    return f"{x:.0e}".replace("e-0", "e-")


def _bullet(text):
    return textwrap.fill(text, 90, initial_indent="- ", subsequent_indent="  ")


def render(results, libs, counts, meta):
    from run import _cpu

    axis = meta.get("max_steps", [MAX_STEPS])
    base = min(axis)
    cmd = meta.get("command") or ("python benchmarks/outputs.py"
                                  + (" --quick" if meta["quick"] else ""))
    rounds = ("one round" if meta["rounds"] == 1 else
              f"{meta['rounds']} rounds (every other one in reverse order)")
    desc = (f"MLP dy/dt = W2 tanh(W1 y + b1) + b2, state {STATE}, hidden {HIDDEN}, batch "
            f"{BATCH}, float32, seeded weights (benchmarks/outputs.py `make`); Dopri5, "
            f"rtol={_g(RTOL)}, atol={_g(ATOL)} for every library; t ∈ [0, {T1:g}]; n output "
            f"times equally spaced in [0, {T1:g}] (ts[0] = 0, the start); loss = sum(ys²)/2 "
            f"over all outputs; forward+backward = loss and gradients w.r.t. y0, W1, b1, W2, "
            f"b2")
    ver = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    has_interpolate = "yes" if meta["interpolate"] else "no (every output is a step)"
    axis_txt = ", ".join(f"{x:,}" for x in axis)
    times = (f"Times: each (library, mode, output count, max_steps) in a child process of its "
             f"own; the first call (trace/compile) is excluded and shown apart as \"compile "
             f"s\" (first call − median), and a second untimed call warms up; {rounds}, up to "
             f"{meta['reps']} repetitions per round (fewer for slow calls), forward and "
             f"forward+backward alternated; medians of all repetitions (\"reps\" column). "
             f"Within a round the entries run count by count, max_steps by max_steps, the "
             f"libraries one after another, so that the entries a target compares across "
             f"libraries run back to back.")
    load = (f"Other load: the share of the machine's CPU time that other processes used "
            f"while an entry was measured (/proc/stat minus this benchmark's children; the "
            f"largest over the rounds). This VM is shared: a child above "
            f"{MAX_OTHER_LOAD:.0%} is measured again once the machine is quiet (at most "
            f"{meta.get('attempts', 3)} attempts, the least loaded kept).")
    if meta.get("attempts", 3) == 1:
        load = ("Other load: the share of the machine's CPU time that other processes used "
                "while an entry was measured (/proc/stat minus this benchmark's children; the "
                "largest over the rounds). This run measured every child once whatever the "
                "load (--attempts 1): entries with a high other load are noisy.")
    check = (f"relative 2-norm errors against float64 (SciPy DOP853 at rtol=atol=1e-12; "
             f"gradients from the adjoint equations solved backwards at 1e-10); "
             f"\"WRONG\" when one exceeds {_g(MAX_REL_ERROR)} or is not finite")
    steps_txt = (f"max_steps: {axis_txt} (the --max-steps axis) for "
                 + ", ".join(" ".join(_label(x, meta)) for x in libs if on_axis(x))
                 + f" (diffrax: `diffeqsolve(max_steps=...)`, tfaca: `solve(max_steps=...)`); "
                 f"every other entry, the per-count table and issue 10's targets at {base:,}, "
                 f"the smallest (issue 10's runs used 100: both are near the ~13 accepted "
                 f"steps the problem takes); tfaca's interpolate=False row at count − 1 + "
                 f"{base:,}, TFP's max_num_steps 40 × {base:,}.")
    judged, info = targets(results, counts, base)
    table = summary_table(results, libs, counts, base, meta)
    ms_table = max_steps_table(results, libs, counts, axis, meta)
    t26, _ = targets_26(results, libs, counts)
    t26_intro = textwrap.fill(
        f"Per tfaca mode: {T26_STEPS_COUNT} outputs at max_steps {T26_HIGH:,} within "
        f"{_bound(T26_STEPS_MAX)}× of max_steps {T26_LOW:,}; at max_steps {T26_HIGH:,}, "
        f"{T26_MANY:,} outputs within {_bound(T26_COUNT_MAX)}× of {T26_FEW}; at max_steps "
        f"{T26_HIGH:,}, at most {_bound(T26_DIFFRAX_MAX)}× diffrax at every count. A ratio "
        f"counts only from entries that ran and whose tfaca side passed the check; a missing "
        f"or failed entry is a miss.", 90)
    baseline = ""
    if meta.get("baseline"):
        baseline = (f"- Baseline (rows \"tfaca (baseline)\", `--baseline-root`): "
                    f"{meta['baseline']}, measured in the same run, interleaved.\n")
    intro = textwrap.fill(
        f"Forward+backward time in ms (accepted steps in brackets, where the library reports "
        f"them) against the number of output times, from `{cmd}` on {meta['date']}: issue "
        f"10's MLP (state {STATE}, hidden {HIDDEN}, batch {BATCH}, float32), Dopri5 at "
        f"rtol={_g(RTOL)}, atol={_g(ATOL)} over t ∈ [0, {T1:g}] for every library, loss over all "
        f"outputs, gradients for y0 and the weights, max_steps {base:,}. WRONG marks outputs "
        f"or gradients off a float64 reference by more than {_g(MAX_REL_ERROR)}. Method, every "
        f"entry and notes: [`benchmarks/outputs.md`](benchmarks/outputs.md).", 90)
    section = f"{intro}\n\n{table}\n\n{judged}\n"
    if len(axis) > 1:
        section += (f"\nThe same against max_steps ({axis_txt}; issue 26):\n\n{ms_table}\n\n"
                    f"{t26}\n")
    md = f"""# Output times: forward+backward time against the number of outputs and max_steps

Generated by `{cmd}` on {meta['date']} in {meta['total_s'] / 60:.1f} min.

- Machine: {_cpu()}; CPU only, Python {platform.python_version()}.
- Versions: {ver}.
- tfaca: {meta['tfaca']}; `interpolate` keyword: {has_interpolate}.
{baseline}{_bullet("Problem: " + desc + ".")}
{_bullet(steps_txt)}
{_bullet(times)}
{_bullet(load)}
{_bullet("Check: " + check + ".")}

## Forward+backward ms (accepted steps), max_steps {base:,}

{table}

## Forward+backward ms against max_steps

{ms_table}

## Targets (issue 10), max_steps {base:,}

{judged}
{info}

## Targets (issue 26)

{t26_intro}

{t26}

## Every entry

{full_table(results, libs, counts, axis, meta)}

Notes:
- Steps: tfaca and diffrax report accepted/rejected steps; torchdiffeq's are counted by
  wrapping its `_adaptive_step`; TorchDiffEqPack's accepted steps are `solver.neval` and
  its rejected ones the trial steps (run without a graph) minus the accepted; TFP does not
  expose steps, so its forward function evaluations are shown.
- tfaca's default mode is a plain `tf.function` around `tfaca.solve` with its default
  `jit_compile="auto"`, under which tfaca compiles its own loops; "jit_compile=True"
  rows compile the whole function with XLA.
- tfaca with 2 output times has nothing to interpolate: `interpolate=True` and `False`
  run the same solve there, so the 2-output entries of its XLA rows are one computation
  measured twice, and every count above 2 adds what dense output costs by itself.
- TorchDiffEqPack's default `interpolation_method="cubic"` builds the Hermite cubic from
  the two end values of a step only, with the secant as the slope at both ends: that is
  linear interpolation. It fails the check as soon as outputs fall inside steps (even
  the 2-output entry interpolates, since it steps past t = 2). Its `"polynomial"` option
  is Dopri5's own interpolant (the `tdep-poly` row).
- TFP's error norm is stricter than everyone else's (see BENCHMARKS.md), so it takes
  more steps at the same tolerance; its adjoint solves backwards between every pair of
  consecutive output times.
- max_steps bounds the trial steps; the problem takes ~13 accepted steps whatever it is,
  so any growth of a row of the max_steps table with max_steps is overhead (under XLA
  tfaca's buffers are sized by it; diffrax's RecursiveCheckpointAdjoint sizes its
  checkpoints from it).
"""
    return md, section


# ----------------------------------------------------------------------------- main

def _ints(text):
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def _load(path):
    """Results and meta saved by --json; an issue 10 file (keys 'lib|n', measured at
    max_steps 100) reads as a one-value max_steps axis."""
    with open(path) as fh:
        saved = json.load(fh)
    meta = saved["meta"]
    meta.setdefault("max_steps", [100])
    results = {}
    for k, v in saved["results"].items():
        parts = k.split("|")
        ms = int(parts[2]) if len(parts) > 2 else meta["max_steps"][0]
        results[(parts[0], int(parts[1]), ms)] = v
    return results, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="counts 2, 20 and 1000, max_steps 128 and 4096, one round of 3 "
                         "repetitions")
    ap.add_argument("--counts", default=None, help="default 2,20,200,1000 (--quick: 2,20,1000)")
    ap.add_argument("--max-steps", default=None,
                    help="max_steps axis for " + ", ".join(AXIS_LIBS) + "; default "
                         + ",".join(map(str, MAX_STEPS_AXIS)) + " (--quick: 128,4096); "
                         "every other entry at the smallest")
    ap.add_argument("--libs", default=",".join(ORDER),
                    help=f"from {','.join(ORDER)} ('tfaca' is the default mode; "
                         f"'tfaca-xla' the same under tf.function(jit_compile=True))")
    ap.add_argument("--reps", type=int, default=None, help="per round (default 5; --quick 3)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (--quick 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed calls per child and kind (default 30; --quick 8)")
    ap.add_argument("--attempts", type=int, default=3,
                    help="measure a child again, after waiting for a quiet machine, while "
                         f"other processes used over {MAX_OTHER_LOAD * 100:.0f}%% of the CPU, up to "
                         "this many times (default 3; 1: once, whatever the load)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the child processes (needs the peers)")
    ap.add_argument("--tfaca-root", default=ROOT,
                    help="directory whose tfaca/ the children import (default: this checkout)")
    ap.add_argument("--baseline-root", default=None,
                    help="also measure the tfaca/ of this checkout (tfaca and tfaca-xla "
                         "rows, marked baseline), interleaved with --tfaca-root's")
    ap.add_argument("--out", default=os.path.join(HERE, "outputs.md"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--render-only", action="store_true",
                    help="re-write the reports from the results saved in --json")
    ap.add_argument("--no-docs", action="store_true",
                    help="leave BENCHMARKS.md and docs/speed.md as they are")
    ap.add_argument("--child", nargs=3, metavar=("LIB", "N", "MAX_STEPS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    reps = a.reps or (3 if a.quick else 5)
    budget = a.budget or (8.0 if a.quick else 30.0)
    if a.child:
        child_main(a.child[0], int(a.child[1]), int(a.child[2]), reps, budget)
        return
    counts = _ints(a.counts or ("2,20,1000" if a.quick else ",".join(map(str, COUNTS))))
    axis = sorted(set(_ints(a.max_steps or ("128,4096" if a.quick
                                            else ",".join(map(str, MAX_STEPS_AXIS))))))
    libs = [x for x in a.libs.split(",") if x]
    for x in libs:
        if x not in LIBS:
            ap.error(f"unknown library/mode {x!r}; choose from {ORDER}")
    rounds = a.rounds or (1 if a.quick else 2)

    if a.render_only:
        results, meta = _load(a.json)
        counts, axis = meta["counts"], meta["max_steps"]
        libs = [x for x in meta["libs"] if _base_lib(x) in LIBS]
    else:
        start = time.perf_counter()
        roots = {"": a.tfaca_root}
        if a.baseline_root:
            roots[BASELINE] = a.baseline_root
        probes = {}
        for tag, root in roots.items():
            probe = _probe(a.python, root)
            if not os.path.realpath(probe["path"]).startswith(os.path.realpath(root)):
                sys.exit(f"the children import tfaca from {probe['path']}, not from {root}")
            print(f"tfaca{tag} from {probe['path']}; interpolate keyword: "
                  f"{probe['interpolate']}", flush=True)
            probes[tag] = probe
        libs = [x for x in libs if LIBS[x][3] != "interpolate" or probes[""]["interpolate"]]
        if a.baseline_root:
            libs = [y for x in libs for y in ([x, x + BASELINE] if x in BASELINE_LIBS else [x])]
        for n in counts:
            t0 = time.perf_counter()
            load_reference(n)
            print(f"[ref] {n} outputs: {time.perf_counter() - t0:.1f} s", flush=True)
        order = entries(libs, counts, axis)
        print(f"{len(order)} entries x {rounds} round(s)", flush=True)
        per_round = []
        for k in range(rounds):
            results = {}
            for lib, n, ms in (order[::-1] if k % 2 else order):
                t0 = time.perf_counter()
                root = roots[BASELINE if lib.endswith(BASELINE) else ""]
                r = _measure(a.python, [lib, str(n), str(ms), "--reps", str(reps), "--budget",
                                        str(budget)], root, a.attempts)
                results[(lib, n, ms)] = r
                status = (r["error"][:200] if "error" in r else
                          f"fwd+bwd {_ms(_median_ms(r['fwdbwd_times']))} ms, steps "
                          f"{_steps_cell(r)}, err ys {_sci(r['err_y'])}, other load "
                          f"{r['other_load']:.0%}")
                print(f"[{time.perf_counter() - start:6.0f}s] round {k + 1} {lib:24s} {n:5d} "
                      f"{ms:5d} ({time.perf_counter() - t0:5.1f}s): {status}", flush=True)
            per_round.append(results)
        results = _merge(per_round)
        from run import _versions

        meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    total_s=time.perf_counter() - start, quick=a.quick, reps=reps,
                    rounds=rounds, counts=counts, max_steps=axis, libs=libs,
                    attempts=a.attempts,
                    interpolate=probes[""]["interpolate"],
                    command="python benchmarks/outputs.py" + (
                        " " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip(),
                    tfaca=_tfaca_commit(a.tfaca_root) or probes[""]["path"],
                    versions=_versions(a.python))
        if a.baseline_root:
            meta["baseline"] = (_tfaca_commit(a.baseline_root) or probes[BASELINE]["path"])
            meta["baseline_interpolate"] = probes[BASELINE]["interpolate"]
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(dict(meta=meta, results={f"{k[0]}|{k[1]}|{k[2]}": v
                                                   for k, v in results.items()}), fh, indent=1)

    md, section = render(results, libs, counts, meta)
    from run import replace_section, write_report

    write_report(a.out, md)
    if not a.no_docs:
        if replace_section(os.path.join(ROOT, "BENCHMARKS.md"), section, "outputs-table",
                           "## Output times"):
            print("updated BENCHMARKS.md")
        if replace_section(os.path.join(ROOT, "docs", "speed.md"), section, "outputs-table"):
            print("updated docs/speed.md")


if __name__ == "__main__":
    main()
