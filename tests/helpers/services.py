"""Real services the tests need, and what to do when one is missing."""

from __future__ import annotations

import os

import pytest

# .ci/run sets this: there a missing PostgreSQL, Redis or data file is a failure, not a skip.
REQUIRE_SERVICES = os.environ.get("NOS_REQUIRE_SERVICES") == "1"


def unavailable(what: str, reason: str) -> None:
    """Skip the test outside CI when `what` cannot be reached; fail it under CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (NOS_REQUIRE_SERVICES=1) but {reason}", pytrace=False)
    pytest.skip(f"{what} not available: {reason}")
