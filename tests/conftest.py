"""Fixtures of the test suite. The helpers they use live in tests/_helpers (test modules
import them from there, never from here).
"""

import pytest

from _helpers.models import ALL_MODELS, ModelSpec


@pytest.fixture(params=ALL_MODELS, ids=lambda s: s.name)
def spec(request) -> ModelSpec:
    return request.param
