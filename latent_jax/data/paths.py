"""Where the real data files live.

Search order for a file such as ``prosqa/valid.json``:

1. ``$LATENT_JAX_DATA`` (a folder laid out like ``shared/data``),
2. ``$LATENT_JAX_SHARED/data``,
3. ``<repo>/../shared/data`` (the checkout's sibling ``shared`` folder),
4. the copies shipped in the package, ``latent_jax/data/files`` (the small validation files only).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_FILES = Path(__file__).resolve().parent / "files"
_REPO = Path(__file__).resolve().parents[2]


def data_dirs() -> list[Path]:
    """The candidate data folders, in search order (only those that exist)."""
    dirs: list[Path] = []
    if os.environ.get("LATENT_JAX_DATA"):
        dirs.append(Path(os.environ["LATENT_JAX_DATA"]))
    if os.environ.get("LATENT_JAX_SHARED"):
        dirs.append(Path(os.environ["LATENT_JAX_SHARED"]) / "data")
    dirs += [_REPO.parent / "shared" / "data", PACKAGE_FILES]
    return [d for d in dirs if d.is_dir()]


def find_data_file(relpath: str) -> Path:
    """Return the first existing ``<data dir>/relpath``; FileNotFoundError lists the places searched."""
    for d in data_dirs():
        p = d / relpath
        if p.is_file():
            return p
    searched = ", ".join(str(d) for d in data_dirs()) or "(no data folder found)"
    raise FileNotFoundError(f"data file {relpath!r} not found; searched {searched}. "
                            "Set LATENT_JAX_DATA to a folder laid out like shared/data.")
