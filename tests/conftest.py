from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """Golden data of the official FantasyTalking implementation (see tests/fixtures/official/README.md)."""
    return OFFICIAL
