"""Shared fixtures. The embedded model is loaded once per session; every test gets its own cache dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_PDFS = REPO.parent / "shared" / "corpus" / "pdfs"


def _fetched(name: str) -> Path | None:
    """A named model fetched into the user's own cache (found before the tests isolate the cache)."""
    from ra_cli.model.resolve import NAMED, downloads_dir

    path = downloads_dir() / NAMED[name].file_name
    return path if path.is_file() else None


QWEN = _fetched("qwen2.5-coder-0.5b")  # the 32K-context model: its tests skip cleanly without it

LIGHTHOUSE = (
    "The lighthouse on Karsk Island was built in 1871 by the engineer Mira Oster. "
    "Its lamp is visible for 19 nautical miles. In 1902 the keeper was Tobias Venn, who kept goats "
    "and recorded the weather three times a day. The lighthouse was automated in 1968.\n"
)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """Converted models are expensive to create (GGUF dequantization): share them across tests."""
    return Path(os.environ.get("RA_TEST_MODEL_CACHE") or tmp_path_factory.mktemp("ra-models"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, model_cache_dir, monkeypatch):
    """Each test gets an empty context cache; converted models come from the shared dir."""
    root = tmp_path / "ra-cache"
    root.mkdir()
    (root / "models").symlink_to(model_cache_dir, target_is_directory=True)
    monkeypatch.setenv("RA_CACHE_DIR", str(root))
    monkeypatch.delenv("RA_MODEL", raising=False)
    return root


@pytest.fixture(scope="session")
def loaded(model_cache_dir):
    """The real embedded model (SmolLM2-135M-Instruct), float32 on CPU."""
    import torch

    torch.manual_seed(0)
    old = os.environ.get("RA_CACHE_DIR")
    root = model_cache_dir.parent / "ra-session-cache"
    root.mkdir(exist_ok=True)
    if not (root / "models").exists():
        (root / "models").symlink_to(model_cache_dir, target_is_directory=True)
    os.environ["RA_CACHE_DIR"] = str(root)
    try:
        from ra_cli.model import load_model

        return load_model(None, device="cpu", dtype="float32")
    finally:
        if old is None:
            os.environ.pop("RA_CACHE_DIR", None)
        else:
            os.environ["RA_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def loaded_fast(loaded, model_cache_dir):
    """The embedded model as ra runs it by default on a CPU: bf16 activations, int4 decode weights."""
    old = os.environ.get("RA_CACHE_DIR")
    os.environ["RA_CACHE_DIR"] = str(model_cache_dir.parent / "ra-session-cache")
    try:
        from ra_cli.model import load_model

        return load_model(None, device="cpu", dtype="auto")
    finally:
        if old is None:
            os.environ.pop("RA_CACHE_DIR", None)
        else:
            os.environ["RA_CACHE_DIR"] = old


@pytest.fixture
def reuse_loaded_model(loaded, monkeypatch):
    """Make CLI commands reuse the session's model instead of loading it again."""
    import ra_cli.model

    monkeypatch.setattr(ra_cli.model, "load_model", lambda *args, **kwargs: loaded)
    return loaded


@pytest.fixture
def lighthouse_txt(tmp_path) -> Path:
    path = tmp_path / "lighthouse.txt"
    path.write_text(LIGHTHOUSE)
    return path
