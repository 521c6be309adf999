"""Test-session set-up: offline copies of public data, figures to a temp dir, fast mode.

The product downloads GPT-2's vocabulary and the corpus on a user's machine.
CI has no network, so when ``../shared/data`` (or ``$LLMLAB_SHARED_DATA``) is
present the tests pre-fill the caches from it; the product never reads it.
Environment variables set here reach the notebook kernels that nbval starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def shared_data_dir() -> Path | None:
    """The folder of reference data beside the checkout, if there is one."""
    candidate = Path(os.environ.get("LLMLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    return candidate if (candidate / "gpt2.tiktoken").is_file() else None


_TMP: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("LLMLAB_FAST", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        # Several workers (and the notebook kernels they start) share the cores: one thread each,
        # or tiny matrix products slow down a hundredfold from oversubscription.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tmp = tempfile.mkdtemp(prefix="llmlab-tests-")
    _TMP.append(tmp)
    os.environ.setdefault("LLMLAB_FIGURES_DIR", os.path.join(tmp, "figures"))
    shared = shared_data_dir()
    if shared is not None:
        tiktoken_cache = Path(tmp, "tiktoken")
        tiktoken_cache.mkdir()
        shutil.copy(shared / "gpt2.tiktoken", tiktoken_cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
        os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache)
        corpus_cache = Path(tmp, "llmlab-cache")
        corpus_cache.mkdir()
        shutil.copy(shared / "tinyshakespeare.txt", corpus_cache / "tinyshakespeare.txt")
        os.environ["LLMLAB_CACHE_DIR"] = str(corpus_cache)


def pytest_unconfigure(config: pytest.Config) -> None:
    for tmp in _TMP:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data folder; tests that need it are skipped where it is absent."""
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no ../shared/data beside the checkout (set LLMLAB_SHARED_DATA)")
    return shared


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The tiny Shakespeare corpus, through the package's own loader (cache pre-filled offline)."""
    from llmlab.data import load_corpus

    return load_corpus()
