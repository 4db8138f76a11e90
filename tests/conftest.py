import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA compiles without LLVM's optimizations in the tests (and the example and worker
# processes they start, which inherit it): compiling the solver's loops is a large part
# of the quick suite's time (about a quarter, measured on 2 cores), and the tests compare
# results to rounding, not speed. Set XLA_FLAGS (even empty) to test the optimized code.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    tf.random.set_seed(0)
    yield


@pytest.fixture
def keras_seed():
    """A fresh Keras session and seed (`pytestmark = pytest.mark.usefixtures("keras_seed")`
    in the Keras test files)."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow_variants` on a parametrized test: its first parameter set runs
    in the quick suite (`-m "not slow"`), every other one is marked slow. The quick suite
    then covers the test once and the slow one the whole matrix."""
    first = {}
    for item in items:
        if item.get_closest_marker("slow_variants") is None or not hasattr(item, "callspec"):
            continue
        key = (item.path, item.originalname)
        if first.setdefault(key, item.nodeid) != item.nodeid:
            item.add_marker(pytest.mark.slow)
