import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: tests are many tiny ops, where thread hand-offs cost more than they save (and the
# suite also launches subprocesses that would oversubscribe the cores).
torch.set_num_threads(1)

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
