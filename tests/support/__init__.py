"""Helpers shared by the test layers: real peers, processes and stand-ins, no tests."""

import os

import pytest

SANDBOX = "sb-test"  # the sandbox id the integration `crishim` fixture serves


def missing(what: str) -> None:
    """A tool the tests drive is not installed: a skip on a developer's box, a failure in
    CI (CI=true), where `deploy/install.sh --test` must have provided it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (CI must have it)")
    pytest.skip(f"{what} is not installed")
