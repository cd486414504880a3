import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def require(*programs):
    """Skip the calling test where one of the programs (names on PATH, or paths) is missing, but fail it where CI
    is set: .ci/run installs them, and a CI job without them must not pass by skipping."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    why = f"needs {', '.join(missing)} (not installed)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, but this test {why}", pytrace=False)
    pytest.skip(why)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*programs): the test runs these programs; see conftest.require")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        require(*mark.args)
