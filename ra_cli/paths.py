"""Where ra keeps converted models and cached contexts (XDG cache; RA_CACHE_DIR overrides)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("RA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ra"


def models_dir() -> Path:
    return cache_root() / "models"


def contexts_dir() -> Path:
    return cache_root() / "contexts"
