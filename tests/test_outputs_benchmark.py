"""benchmarks/outputs.py's tfaca runner, without the peers: with dense output the accepted
steps of the output-count benchmark's problem do not depend on the number of outputs."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import outputs  # noqa: E402


def test_output_times_are_float32_and_span_the_interval():
    for n in outputs.COUNTS:
        ts = outputs.output_times(n)
        assert ts.dtype == np.float32 and ts.shape == (n,)
        assert ts[0] == 0.0 and ts[-1] == outputs.T1


def test_tfaca_runner_steps_do_not_depend_on_the_output_count():
    assert outputs.tfaca_has_interpolate()
    runs = {}
    for n in (2, 20):
        runner = outputs.TfacaRunner(n, compile="eager", interpolate=True)
        ys, grads = runner.fwdbwd()
        assert ys.shape == (n, outputs.BATCH, outputs.STATE)
        assert len(grads) == 5 and all(np.all(np.isfinite(g)) for g in grads)
        runs[n] = ys, runner.steps()
    (ys2, steps2), (ys20, steps20) = runs[2], runs[20]
    assert steps2 == steps20
    assert 5 <= steps2[0] <= 30  # the problem is sized for ~13 accepted steps
    # The same steps end on the same state at T.
    np.testing.assert_allclose(ys20[-1], ys2[-1], rtol=1e-5, atol=1e-5)
