import json
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
# CI checks out the parity fixtures with the code: there a missing fixture is a broken run, not a skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_fixture(message: str) -> None:
    """Fail the test in CI (CI=true), skip it elsewhere; `message` names what is missing and where."""
    message += " (check out ../shared/fixtures/rxlm-parity next to the repository, or set RXT_PARITY_FIXTURES)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_parity_fixture(name: str = "") -> Path:
    """The parity fixture directory, or the fixture `name` in it; see `missing_fixture` when it is absent."""
    path = FIXTURES / name if name else FIXTURES
    if not path.is_dir():
        missing_fixture(f"rxlm parity fixture not found at {path}")
    return path


def golden_fixture_params(kind: str) -> list:
    """One pytest param per fixture directory with golden outputs of a `kind` "full" model or a memory-attention
    "component". None found: one param that fails in CI and skips elsewhere (an empty parameter set would
    skip without naming the path)."""
    found = []
    if FIXTURES.is_dir():
        for path in sorted(p for p in FIXTURES.iterdir() if (p / "golden.safetensors").is_file()):
            is_full = "decoder_config" in json.loads((path / "config.json").read_text())
            if (kind == "full") == is_full:
                found.append(pytest.param(path, id=path.name))
    what = {"full": "a full RxT model", "component": "a memory-attention component"}[kind]
    message = f"no rxlm parity fixture of {what} (golden.safetensors) found in {FIXTURES}"
    return found or [pytest.param(FIXTURES, id="missing", marks=pytest.mark.missing_parity_fixture(message))]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    marker = item.get_closest_marker("missing_parity_fixture")
    if marker is not None:
        missing_fixture(marker.args[0])


@pytest.fixture(scope="session")
def parity_fixtures() -> Path:
    return require_parity_fixture()


micro_log: dict = {}  # output directory -> what `rxt train` printed


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """The main job on the micro preset (stages 0-5, the retention check, the Hub-ready directory), trained
    once per session for every test that needs a trained model (tests/test_main_job.py, the README's and the
    model card's snippets)."""
    import contextlib
    import io

    from transformers_rxt.cli import main

    out = tmp_path_factory.mktemp("micro")
    threads = torch.get_num_threads()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # same dialogues as the micro stage-4 check: 16, distances <= 8
            code = main(["train", "--preset", "micro", "--output", str(out), "--eval-dialogues", "16"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, log.getvalue()
    micro_log[str(out)] = log.getvalue()
    return out
