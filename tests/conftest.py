"""Fixtures shared by the tests: tiny SD3 / SD3.5 pipelines, unpatched again after every test."""

from __future__ import annotations

import pytest

from support import SD3_SPEC, SD35_SPEC, tiny_pipeline


@pytest.fixture(scope="session")
def sd3_pipe():
    return tiny_pipeline(SD3_SPEC)


@pytest.fixture(scope="session")
def sd35_pipe():
    return tiny_pipeline(SD35_SPEC)


@pytest.fixture(autouse=True)
def _unpatch_session_pipes(request):
    """Tests share the session pipelines; make sure none leaves SDTM applied."""
    yield
    from sdtm import remove_SDTM

    for name in ("sd3_pipe", "sd35_pipe"):
        if name in request.fixturenames:
            remove_SDTM(request.getfixturevalue(name))
