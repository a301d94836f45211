import os
from pathlib import Path

import pytest

# Tests are offline and must never touch the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("RXT_PARITY_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "rxlm-parity"))


@pytest.fixture(scope="session")
def parity_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"rxlm parity fixtures not found at {FIXTURES}")
    return FIXTURES
