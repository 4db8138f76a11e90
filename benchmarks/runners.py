"""One runner per (library, mode): the same problem, weights, Dopri5, tolerances, float32.

A runner exposes
    fwd()          -> y(T) as NumPy                      (forward only, no gradient kept)
    fwdbwd()       -> (y(T), [dL/dy0, dL/dw...])          loss = sum(y(T)^2) / 2, TF layout
    counts()       -> dict(nfe_fwd, nfe_bwd, steps, rejected)  (None where not available)
    vf_time()      -> (seconds of one f(y), seconds of one f(y) + its VJP), isolated
and a class attribute `vjp_rule` telling how many VJPs of f its backward does (see
benchmarks/README.md, "overhead factor").

Frameworks are imported lazily: a child process loads one library only.
"""

import math
import os
import time

import numpy as np

from problems import K1, K2, SPECS, field, make

# MALI (ALF, gradient="mali"; TorchDiffEqPack odesolve_adjoint_sym12): the ALF's error
# estimate h (u - v) is first order, and at the problems' atol = 1e-6 the mlp takes
# ~6,800 ALF steps (Dopri5: 62). Both MALI entries run at one looser tolerance, in the
# range the MALI reference code suggests (rtol 1e-2..1e-3, atol 1e-3); on mlp it also takes
# fewer steps than rtol = 1e-2 (892 against 1,165). benchmarks/mali_speed.md states it.
MALI_TOL = dict(rtol=1e-3, atol=1e-3)
# Trial-step bound of the MALI entries (~2x the steps measured at MALI_TOL); under XLA it
# sizes only scalar buffers (each step's t and dt), MALI keeps no states.
MALI_MAX_STEPS = {"mlp": 2000, "conv": 500, "threebody": 20000}


def _median_time(fn, n, min_time=0.0):
    times = []
    t_total = 0.0
    while len(times) < n or t_total < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        t_total += dt
        if len(times) > 1000:
            break
    return float(np.median(times))


# --------------------------------------------------------------------------- TF / tfaca / TFP

def _tf_vf(tf, problem, w):
    if field(problem) == "mlp":
        return lambda y: tf.tanh(y @ w[0] + w[1]) @ w[2] + w[3]
    if field(problem) == "conv":
        return lambda y: tf.nn.conv2d(
            tf.tanh(tf.nn.conv2d(y, w[0], 1, "SAME") + w[1]), w[2], 1, "SAME") + w[3]

    # Same formula in every framework (problems.threebody_numpy): broadcasts and sums, no
    # three-operand einsum (in a TF graph loop that einsum alone cost 107 us against 19 us
    # for this whole function).
    eye = np.eye(3, dtype=np.float32)

    def threebody(y):
        r = tf.reshape(y[:, :9], (-1, 3, 3))
        d = r[:, None, :, :] - r[:, :, None, :]  # d[b, i, j] = r_j - r_i
        e = tf.cast(eye, y.dtype)
        inv3 = (1 - e) * tf.math.rsqrt(tf.reduce_sum(d * d, -1) + e) ** 3
        a = K1 * tf.reduce_sum((w[0] * inv3)[..., None] * d, 2)
        return tf.concat([K2 * y[:, 9:], tf.reshape(a, (-1, 9))], 1)

    return threebody


class TfacaRunner:
    """tfaca.solve in a tf.function. Modes: "aca", "naive", "adjoint": a plain
    tf.function, the solve at its default `jit_compile="auto"` (the solver's loops
    compiled where its rule says); "aca_xla": the whole function compiled
    (`tf.function(jit_compile=True)`); "aca_nojit": the solve's `jit_compile=False`, every
    op through TensorFlow's executor (tfaca before issue 12)."""

    def __init__(self, problem, mode, dtype="float32", rtol=None, atol=None, max_steps=None,
                 jit_compile="auto", controller=None, norm="full"):
        import tensorflow as tf

        import tfaca

        self.tf = tf
        spec = SPECS[problem]
        p = make(problem)
        npdt = np.dtype(dtype)
        self.gradient_mode = {"aca": "aca", "aca_xla": "aca", "aca_nojit": "aca", "naive": "naive",
                              "adjoint": "adjoint", "mali": "mali", "mali_xla": "mali",
                              "aca_budget": "aca"}[mode]
        self.vjp_rule = {"aca": "bwd", "naive": "fwd", "adjoint": "bwd",
                         "mali": "bwd"}[self.gradient_mode]
        if mode == "aca_budget":
            self.vjp_rule = "budget"  # each step rebuilt (f-evals) then replayed (VJPs)
        xla = mode in ("aca_xla", "mali_xla")
        self.mode = mode
        self.y0 = tf.constant(p["y0"].astype(npdt))
        self.ws = [tf.Variable(w.astype(npdt), name=n) for n, w in p["weights"]]
        f = _tf_vf(tf, problem, self.ws)
        self.f = f
        ts = tf.constant([0.0, spec["t1"]], dtype=npdt)
        mali = self.gradient_mode == "mali"
        kw = dict(method="alf" if mali else "dopri5",
                  rtol=rtol or (MALI_TOL["rtol"] if mali else spec["rtol"]),
                  atol=atol or (MALI_TOL["atol"] if mali else spec["atol"]),
                  max_steps=max_steps or (MALI_MAX_STEPS[field(problem)] if mali else spec["max_steps"]),
                  jit_compile=False if mode == "aca_nojit" else jit_compile,
                  controller=controller)
        self.tolerances = (kw["rtol"], kw["atol"])
        strategy = (tfaca.AdjointGradient(norm=norm) if self.gradient_mode == "adjoint"
                    else self.gradient_mode)
        self.checkpoints = self.full_aca_steps = None
        if mode == "aca_budget":
            # K ~ sqrt(N): the full ACA solve's accepted steps N, from one forward solve.
            probe = tf.function(lambda y0: tfaca.solve(
                lambda t, y: f(y), y0, ts, gradient="aca", **kw).stats.num_steps)
            self.full_aca_steps = int(probe(self.y0))
            self.checkpoints = max(1, round(math.sqrt(self.full_aca_steps)))
            strategy = tfaca.ACAGradient(checkpoints=self.checkpoints)

        self.strategy = strategy

        def solve(y0):
            return tfaca.solve(lambda t, y: f(y), y0, ts, gradient=strategy, **kw)

        @tf.function(jit_compile=xla)
        def fwd(y0):
            sol = solve(y0)
            return sol.ys[-1], sol.stats.num_steps, sol.stats.num_rejected, sol.stats.num_fevals

        @tf.function(jit_compile=xla)
        def fwdbwd(y0):
            with tf.GradientTape() as tape:
                tape.watch(y0)
                sol = solve(y0)
                yT = sol.ys[-1]
                loss = 0.5 * tf.reduce_sum(yT**2)
            grads = tape.gradient(loss, [y0] + self.ws)
            st = sol.stats
            if self.gradient_mode == "adjoint":
                nfe_b = strategy.backward_stats.num_fevals
            else:
                nfe_b = st.num_fevals_backward
            return yT, grads, (st.num_steps, st.num_rejected, st.num_fevals, nfe_b)

        @tf.function(jit_compile=xla)
        def vf(y):
            return f(y)

        @tf.function(jit_compile=xla)
        def vf_vjp(y):
            with tf.GradientTape() as tape:
                tape.watch(y)
                out = f(y)
            return tape.gradient(out, [y] + self.ws, output_gradients=tf.ones_like(out))

        self._fwd, self._fwdbwd, self._vf, self._vf_vjp = fwd, fwdbwd, vf, vf_vjp
        self._last_counts = None

    def fwd(self):
        return self._fwd(self.y0)[0].numpy()

    def fwdbwd(self):
        yT, grads, c = self._fwdbwd(self.y0)
        self._last_counts = [int(x) for x in c]
        return yT.numpy(), [g.numpy() for g in grads]

    def counts(self):
        if self._last_counts is None:
            self.fwdbwd()
        steps, rej, nfe_f, nfe_b = self._last_counts
        out = dict(nfe_fwd=nfe_f, nfe_bwd=nfe_b, steps=steps, rejected=rej,
                   nfe_source="tfaca Solution.stats (+AdjointGradient.backward_stats)")
        if self.mode in ("mali", "mali_xla", "aca_budget"):
            out.update(rtol=self.tolerances[0], atol=self.tolerances[1])
        if self.checkpoints is not None:
            out.update(checkpoints=self.checkpoints, full_aca_steps=self.full_aca_steps)
        return out

    def vf_time(self, n):
        t_f = _median_time(lambda: self._vf(self.y0).numpy(), n, 0.3)
        t_b = _median_time(lambda: [g.numpy() for g in self._vf_vjp(self.y0)], n, 0.3)
        return t_f, t_b


class TfpRunner:
    """tfp.math.ode.DormandPrince, its default (adjoint) gradient, in tf.function."""

    vjp_rule = "bwd"

    def __init__(self, problem, mode):
        import tensorflow as tf
        import tensorflow_probability as tfp

        self.tf = tf
        spec = SPECS[problem]
        p = make(problem)
        self.y0 = tf.constant(p["y0"])
        self.wt = [tf.constant(w) for _, w in p["weights"]]
        names = [f"w{i}" for i in range(len(self.wt))]
        # Same controller bounds as the others (TFP's defaults: min factor 0.1,
        # first step 1e-3 with no automatic selection; the latter is kept).
        solver = tfp.math.ode.DormandPrince(
            rtol=spec["rtol"], atol=spec["atol"], safety_factor=0.9,
            min_step_size_factor=0.2, max_step_size_factor=10.0,
            max_num_steps=spec["max_steps"] * 4)
        self.counter = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        t1 = spec["t1"]

        def make_ode_fn(count):
            def ode_fn(t, y, **c):
                if count:
                    self.counter.assign_add(1)
                return _tf_vf(tf, problem, [c[n] for n in names])(y)
            return ode_fn

        def solve(y0, ws, count=False):
            res = solver.solve(make_ode_fn(count), 0.0, y0, solution_times=[t1],
                               constants=dict(zip(names, ws)))
            return res.states[-1], res.diagnostics.num_ode_fn_evaluations

        @tf.function
        def fwd(y0, ws):
            return solve(y0, ws)

        def _fb(y0, ws, count):
            with tf.GradientTape() as tape:
                tape.watch([y0] + ws)
                yT, nfe = solve(y0, ws, count)
                loss = 0.5 * tf.reduce_sum(yT**2)
            grads = tape.gradient(loss, [y0] + ws)
            return yT, grads, nfe

        self._fwd = fwd
        self._fwdbwd = tf.function(lambda y0, ws: _fb(y0, ws, False))
        self._fwdbwd_count = tf.function(lambda y0, ws: _fb(y0, ws, True))
        self._fwd_count = tf.function(lambda y0, ws: solve(y0, ws, True))
        f = _tf_vf(tf, problem, self.wt)
        self._vf = tf.function(f)

        @tf.function
        def vf_vjp(y, ws):
            with tf.GradientTape() as tape:
                tape.watch([y] + ws)
                out = _tf_vf(tf, problem, ws)(y)
            return tape.gradient(out, [y] + ws, output_gradients=tf.ones_like(out))

        self._vf_vjp = vf_vjp

    def fwd(self):
        return self._fwd(self.y0, self.wt)[0].numpy()

    def fwdbwd(self):
        yT, grads, _ = self._fwdbwd(self.y0, self.wt)
        return yT.numpy(), [g.numpy() for g in grads]

    def counts(self):
        self.counter.assign(0)
        _, nfe_diag = self._fwd_count(self.y0, self.wt)
        nfe_f = int(self.counter.numpy())
        self.counter.assign(0)
        self._fwdbwd_count(self.y0, self.wt)
        nfe_total = int(self.counter.numpy())
        return dict(nfe_fwd=nfe_f, nfe_bwd=nfe_total - nfe_f, steps=None, rejected=None,
                    nfe_source=f"counter variable in ode_fn (diagnostics: {int(nfe_diag)})")

    def vf_time(self, n):
        t_f = _median_time(lambda: self._vf(self.y0).numpy(), n, 0.3)
        t_b = _median_time(lambda: [g.numpy() for g in self._vf_vjp(self.y0, self.wt)], n, 0.3)
        return t_f, t_b


# --------------------------------------------------------------------------- torch

def _torch_module(torch, problem, weights):
    nn = torch.nn

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            if field(problem) == "conv":
                # HWIO -> OIHW; biases as they are.
                conv = [weights[0].transpose(3, 2, 0, 1), weights[1],
                        weights[2].transpose(3, 2, 0, 1), weights[3]]
                self.params = nn.ParameterList([nn.Parameter(torch.tensor(w)) for w in conv])
            else:
                self.params = nn.ParameterList([nn.Parameter(torch.tensor(w)) for w in weights])
            self.nfe = 0

        def forward(self, t, y):
            self.nfe += 1
            w = self.params
            if field(problem) == "mlp":
                return torch.tanh(y @ w[0] + w[1]) @ w[2] + w[3]
            if field(problem) == "conv":
                F_ = torch.nn.functional
                h = torch.tanh(F_.conv2d(y, w[0], w[1], padding=1))
                return F_.conv2d(h, w[2], w[3], padding=1)
            r = y[:, :9].reshape(-1, 3, 3)
            d = r[:, None, :, :] - r[:, :, None, :]
            eye = torch.eye(3, dtype=y.dtype)
            inv3 = (1 - eye) * torch.rsqrt((d * d).sum(-1) + eye) ** 3
            a = K1 * ((w[0] * inv3)[..., None] * d).sum(2)
            return torch.cat([K2 * y[:, 9:], a.reshape(-1, 9)], 1)

    return F()


class TorchRunner:
    """torchdiffeq odeint / odeint_adjoint; TorchDiffEqPack odesolve / odesolve_adjoint /
    odesolve_adjoint_sym12 (MALI: method "sym12async", adaptive, at `MALI_TOL`)."""

    def __init__(self, problem, mode):
        import torch

        if os.environ.get("BENCH_DEVICE") == "gpu":  # run.py --device gpu
            torch.set_default_device("cuda")
        self.torch = torch
        self.problem = problem
        self.mode = mode
        self.spec = spec = SPECS[problem]
        p = make(problem)
        y0 = p["y0"]
        if field(problem) == "conv":
            y0 = y0.transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
        self.y0 = torch.tensor(y0)
        self.func = _torch_module(torch, problem, [w for _, w in p["weights"]])
        self.vjp_rule = {"odeint": "fwd", "odeint_adjoint": "bwd", "odesolve": "tdep",
                         "odesolve_adjoint": "bwd", "mali": "tdep-mali"}[mode]
        self.ts = torch.tensor([0.0, spec["t1"]])
        if mode in ("odeint", "odeint_adjoint"):
            import torchdiffeq
            integ = torchdiffeq.odeint if mode == "odeint" else torchdiffeq.odeint_adjoint
            self._solve = lambda y0: integ(self.func, y0, self.ts, rtol=spec["rtol"],
                                           atol=spec["atol"], method="dopri5")[-1]
        elif mode == "mali":
            import TorchDiffEqPack as tdep

            # As odesolve_adjoint's options (its docstring's keys); it mutates the dict
            # (t0 becomes a tensor), so every call gets a fresh one. h=None: automatic
            # first step. The solve ends on t1 (end_point_mode, its default here).
            def mali_options():
                return {"method": "sym12async", "h": None, "t0": 0.0, "t1": spec["t1"],
                        "rtol": MALI_TOL["rtol"], "atol": MALI_TOL["atol"],
                        "print_neval": False, "neval_max": 500000}
            self._solve = lambda y0: tdep.odesolve_adjoint_sym12(self.func, y0, mali_options())
        else:
            import TorchDiffEqPack as tdep

            def options():
                return {"method": "dopri5", "h": None, "t0": 0.0, "t1": spec["t1"],
                        "rtol": spec["rtol"], "atol": spec["atol"], "print_neval": False,
                        "neval_max": 500000, "t_eval": None, "interpolation_method": "cubic",
                        "regenerate_graph": False}
            if mode == "odesolve":
                self._solve = lambda y0: tdep.odesolve(self.func, y0, options())
            else:
                def adjoint_options():
                    o = options()  # odesolve_adjoint sets regenerate_graph itself
                    del o["regenerate_graph"], o["t_eval"], o["interpolation_method"]
                    return o
                self._solve = lambda y0: tdep.odesolve_adjoint(self.func, y0, adjoint_options())
            self._options = options
        self._accepted = None

    def _to_tf_layout(self, g):
        g = g.detach().cpu().numpy()
        return g

    def fwd(self):
        with self.torch.no_grad():
            return self._out(self._solve(self.y0))

    def _out(self, yT):
        yT = yT.detach().cpu().numpy()
        if field(self.problem) == "conv":
            yT = yT.transpose(0, 2, 3, 1)
        return yT

    def fwdbwd(self):
        torch = self.torch
        y0 = self.y0.clone().requires_grad_(True)
        self.func.nfe = 0
        yT = self._solve(y0)
        self._nfe_fwd = self.func.nfe
        loss = 0.5 * (yT**2).sum()
        params = list(self.func.params)
        grads = torch.autograd.grad(loss, [y0] + params)
        self._nfe_bwd = self.func.nfe - self._nfe_fwd
        grads = [g.detach().cpu().numpy() for g in grads]
        if field(self.problem) == "conv":
            grads[0] = grads[0].transpose(0, 2, 3, 1)
            grads[1] = grads[1].transpose(2, 3, 1, 0)
            grads[3] = grads[3].transpose(2, 3, 1, 0)
        return self._out(yT), grads

    def counts(self):
        torch = self.torch
        steps = rejected = None
        source = "counter in func"
        if self.mode in ("odeint", "odeint_adjoint"):
            from torchdiffeq._impl import rk_common
            orig = rk_common.RKAdaptiveStepsizeODESolver._adaptive_step
            tally = {"acc": 0, "rej": 0}

            def counted(solver, rk_state):
                new = orig(solver, rk_state)
                if bool(new.t1 != rk_state.t1):
                    tally["acc"] += 1
                else:
                    tally["rej"] += 1
                return new

            rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = counted
            try:
                self.fwdbwd()
            finally:
                rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = orig
            # The adjoint's reverse solve runs through the same method: count only forward.
            if self.mode == "odeint_adjoint":
                with torch.no_grad():
                    tally = {"acc": 0, "rej": 0}
                    rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = counted
                    try:
                        self._solve(self.y0)
                    finally:
                        rk_common.RKAdaptiveStepsizeODESolver._adaptive_step = orig
            steps, rejected = tally["acc"], tally["rej"]
            source += "; steps by wrapping torchdiffeq's _adaptive_step"
        elif self.mode == "mali":
            from TorchDiffEqPack.odesolver.adaptive_grid_solver import AdaptiveGridSolver
            from TorchDiffEqPack.odesolver.symplectic import Sym12Async
            orig_integrate, orig_adapt = Sym12Async.integrate, AdaptiveGridSolver.adapt_stepsize
            tally = {"acc": None, "rej": 0}

            def integrate(solver, *a, **k):  # the forward solve returns its step ends
                out = orig_integrate(solver, *a, **k)
                tally["acc"] = len(out[1])
                return out

            def adapt(solver, *a, **k):  # a trial it does not accept is a rejection
                out = orig_adapt(solver, *a, **k)
                tally["rej"] += 0 if out[1] else 1
                return out

            Sym12Async.integrate, AdaptiveGridSolver.adapt_stepsize = integrate, adapt
            try:
                self.fwdbwd()
            finally:
                Sym12Async.integrate, AdaptiveGridSolver.adapt_stepsize = (orig_integrate,
                                                                           orig_adapt)
            steps, rejected = tally["acc"], tally["rej"]
            source += "; steps by wrapping Sym12Async.integrate and adapt_stepsize"
        else:
            self.fwdbwd()
            import TorchDiffEqPack as tdep
            opts = self._options()
            nfe0 = self.func.nfe = 0
            with torch.no_grad():
                solver = tdep.odesolve(self.func, self.y0, opts, return_solver=True)
                solver.integrate(y0=self.y0, t0=opts["t0"], t_eval=[opts["t1"]])
            steps = solver.neval
            nfe = self.func.nfe - nfe0
            # nfe = 2 (first step) + 7 * trials + 7 * accepted (the re-step with grad)
            trials = round((nfe - 2 - 7 * steps) / 7)
            rejected = trials - steps
            source += "; steps from TorchDiffEqPack solver.neval"
            self._accepted = steps
        out = dict(nfe_fwd=self._nfe_fwd, nfe_bwd=self._nfe_bwd, steps=steps,
                   rejected=rejected, nfe_source=source)
        if self.mode == "odesolve":
            out["recorded"] = 7 * steps
        if self.mode == "mali":
            out.update(rtol=MALI_TOL["rtol"], atol=MALI_TOL["atol"])
        return out

    def vf_time(self, n):
        torch = self.torch
        t = torch.tensor(0.0)

        def sync():  # on a GPU the calls only queue work
            if self.y0.is_cuda:
                torch.cuda.synchronize()

        def f():
            with torch.no_grad():
                self.func(t, self.y0)
            sync()

        y = self.y0.clone().requires_grad_(True)
        params = list(self.func.params)

        def fb():
            out = self.func(t, y)
            torch.autograd.grad(out, [y] + params, torch.ones_like(out))
            sync()

        return _median_time(f, n, 0.3), _median_time(fb, n, 0.3)


# --------------------------------------------------------------------------- JAX / diffrax

class DiffraxRunner:
    """diffrax.diffeqsolve, Dopri5 + PIDController (I-controller defaults), jax.jit."""

    def __init__(self, problem, mode):
        import diffrax
        import jax
        import jax.numpy as jnp

        self.jax = jax
        spec = SPECS[problem]
        p = make(problem)
        self.y0 = jnp.asarray(p["y0"])
        self.ws = [jnp.asarray(w) for _, w in p["weights"]]
        adjoint = {"recursive": diffrax.RecursiveCheckpointAdjoint(),
                   "backsolve": diffrax.BacksolveAdjoint()}[mode]
        self.vjp_rule = {"recursive": "fwd", "backsolve": "bwd"}[mode]
        self._count = {"n": 0}

        def vf_of(counting):
            def vf(t, y, w):
                if counting:
                    jax.debug.callback(self._tick)
                if field(problem) == "mlp":
                    return jnp.tanh(y @ w[0] + w[1]) @ w[2] + w[3]
                if field(problem) == "conv":
                    dn = ("NHWC", "HWIO", "NHWC")
                    c = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
                        x, k, (1, 1), "SAME", dimension_numbers=dn)
                    return c(jnp.tanh(c(y, w[0]) + w[1]), w[2]) + w[3]
                r = y[:, :9].reshape(-1, 3, 3)
                d = r[:, None, :, :] - r[:, :, None, :]
                eye = jnp.eye(3, dtype=y.dtype)
                inv3 = (1 - eye) * jax.lax.rsqrt((d * d).sum(-1) + eye) ** 3
                a = K1 * ((w[0] * inv3)[..., None] * d).sum(2)
                return jnp.concatenate([K2 * y[:, 9:], a.reshape(-1, 9)], 1)
            return vf

        def solve(y0, ws, counting=False):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vf_of(counting)), diffrax.Dopri5(), 0.0, spec["t1"], None, y0,
                args=ws, stepsize_controller=diffrax.PIDController(rtol=spec["rtol"],
                                                                   atol=spec["atol"]),
                adjoint=adjoint, max_steps=spec["max_steps"] * 4,
                saveat=diffrax.SaveAt(t1=True))
            return sol.ys[-1], sol.stats

        def loss(y0, ws, counting=False):
            yT, stats = solve(y0, ws, counting)
            return 0.5 * jnp.sum(yT**2), (yT, stats)

        self._fwd = jax.jit(solve)
        self._fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        self._fwd_count = jax.jit(lambda y0, ws: solve(y0, ws, True))
        self._fwdbwd_count = jax.jit(jax.grad(lambda y0, ws: loss(y0, ws, True),
                                              argnums=(0, 1), has_aux=True))
        vf = vf_of(False)
        self._vf = jax.jit(lambda y, ws: vf(0.0, y, ws))

        def vjp(y, ws):
            out, pull = jax.vjp(lambda y_, w_: vf(0.0, y_, w_), y, ws)
            return pull(jnp.ones_like(out))

        self._vf_vjp = jax.jit(vjp)
        self._stats = None

    def _tick(self):
        self._count["n"] += 1

    def fwd(self):
        yT, _ = self._fwd(self.y0, self.ws)
        return np.asarray(yT.block_until_ready())

    def fwdbwd(self):
        (g_y0, g_w), (yT, stats) = self._fwdbwd(self.y0, self.ws)
        g_y0.block_until_ready()
        self._stats = stats
        return np.asarray(yT), [np.asarray(g_y0)] + [np.asarray(g) for g in g_w]

    def counts(self):
        if self._stats is None:
            self.fwdbwd()
        st = {k: int(v) for k, v in self._stats.items()}
        if getattr(self, "slow", False):  # --quick: no second compile for counting
            return dict(nfe_fwd=None, nfe_bwd=None, steps=st["num_accepted_steps"],
                        rejected=st["num_rejected_steps"],
                        nfe_source=f"--quick, slow call: not counted; num_steps={st['num_steps']}")
        self._count["n"] = 0
        out = self._fwd_count(self.y0, self.ws)
        self.jax.block_until_ready(out)
        self.jax.effects_barrier()
        nfe_f = self._count["n"]
        self._count["n"] = 0
        out = self._fwdbwd_count(self.y0, self.ws)
        self.jax.block_until_ready(out)
        self.jax.effects_barrier()
        nfe_total = self._count["n"]
        return dict(nfe_fwd=nfe_f, nfe_bwd=nfe_total - nfe_f,
                    steps=st["num_accepted_steps"], rejected=st["num_rejected_steps"],
                    nfe_source="jax.debug.callback counter in a separate compiled solve; "
                               f"sol.stats num_steps={st['num_steps']}")

    def vf_time(self, n):
        t_f = _median_time(lambda: self._vf(self.y0, self.ws).block_until_ready(), n, 0.3)
        t_b = _median_time(lambda: self.jax.block_until_ready(self._vf_vjp(self.y0, self.ws)),
                           n, 0.3)
        return t_f, t_b


# --------------------------------------------------------------------------- registry

LIBS = {
    # key: (library label, mode label, factory)
    "tfaca-aca": ("tfaca", "ACA tf.function", lambda p: TfacaRunner(p, "aca")),
    "tfaca-aca-xla": ("tfaca", "ACA tf.function(jit_compile)", lambda p: TfacaRunner(p, "aca_xla")),
    # The plain graph with the solver's loops not compiled (tfaca before issue 12).
    "tfaca-aca-nojit": ("tfaca", "ACA tf.function, jit_compile=False",
                        lambda p: TfacaRunner(p, "aca_nojit")),
    # Work-precision companions of tfaca-aca: the same at a third and a tenth of the
    # tolerances (max_steps doubled for the latter).
    "tfaca-aca-tight": ("tfaca", "ACA tf.function, tol/3", lambda p: TfacaRunner(
        p, "aca", rtol=SPECS[p]["rtol"] / 3, atol=SPECS[p]["atol"] / 3)),
    "tfaca-aca-tighter": ("tfaca", "ACA tf.function, tol/10", lambda p: TfacaRunner(
        p, "aca", rtol=SPECS[p]["rtol"] / 10, atol=SPECS[p]["atol"] / 10,
        max_steps=2 * SPECS[p]["max_steps"])),
    "tfaca-naive": ("tfaca", "naive tf.function", lambda p: TfacaRunner(p, "naive")),
    "tfaca-adjoint": ("tfaca", "adjoint tf.function", lambda p: TfacaRunner(p, "adjoint")),
    "torchdiffeq-odeint": ("torchdiffeq", "odeint (backprop)", lambda p: TorchRunner(p, "odeint")),
    "torchdiffeq-adjoint": ("torchdiffeq", "odeint_adjoint",
                            lambda p: TorchRunner(p, "odeint_adjoint")),
    "tdep-odesolve": ("TorchDiffEqPack", "odesolve (ACA)", lambda p: TorchRunner(p, "odesolve")),
    "tdep-odesolve-adjoint": ("TorchDiffEqPack", "odesolve_adjoint (ckpt ACA)",
                              lambda p: TorchRunner(p, "odesolve_adjoint")),
    "diffrax-recursive": ("diffrax", "RecursiveCheckpointAdjoint jit",
                          lambda p: DiffraxRunner(p, "recursive")),
    "diffrax-backsolve": ("diffrax", "BacksolveAdjoint jit", lambda p: DiffraxRunner(p, "backsolve")),
    "tfp": ("TFP", "DormandPrince (adjoint) tf.function", lambda p: TfpRunner(p, "default")),
    # benchmarks/mali_speed.py: MALI (at MALI_TOL) and ACA with a checkpoint budget.
    "tfaca-mali": ("tfaca", "ALF + MALI tf.function", lambda p: TfacaRunner(p, "mali")),
    "tfaca-mali-xla": ("tfaca", "ALF + MALI tf.function(jit_compile)",
                       lambda p: TfacaRunner(p, "mali_xla")),
    "tfaca-aca-budget": ("tfaca", "ACA, ACAGradient(checkpoints=~sqrt(steps)) tf.function",
                         lambda p: TfacaRunner(p, "aca_budget")),
    "tdep-mali": ("TorchDiffEqPack", "odesolve_adjoint_sym12 (MALI, sym12async)",
                  lambda p: TorchRunner(p, "mali")),
}
