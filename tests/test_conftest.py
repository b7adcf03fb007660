"""The test-wide XLA flags (root ``conftest.py``): a flag this jaxlib does not know must be
detected (XLA would abort the test process), and the ones kept must be in effect."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root_conftest():
    spec = importlib.util.spec_from_file_location("_root_conftest",
                                                  os.path.join(ROOT, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the flags are already checked: no second probe
    return module


def test_unknown_xla_flag_is_rejected_and_known_ones_kept(root_conftest):
    assert not root_conftest._accepted("--xla_cpu_no_such_flag_revjax=1")
    if os.environ.get("REVJAX_TEST_FULL_OPT"):
        pytest.skip("full optimisation: no test flags are set")
    assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]
    assert os.environ["XLA_FLAGS"] == os.environ[root_conftest._CHECKED]
