"""What a result was computed from: the code's commit, package versions, machine, and content hashes.

Content hashes (not paths) identify data, checkpoints and plugins, so a cache or a results file
stays valid when a file moves and is invalidated when its bytes change.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "timm", "numpy", "scipy")
_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: not a file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: str | Path) -> str:
    """Hex SHA-256 over every file below ``folder``: its relative POSIX path and file hash, sorted by path.

    Renaming, adding, removing or editing any file changes the hash; the folder's own location and
    the files' timestamps do not. Symbolic links are followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot hash {folder}: not a folder")
    digest = hashlib.sha256()
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    for rel, path in files:
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """:func:`sha256_file` for a file, :func:`sha256_tree` for a folder."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


_CHECKOUT = Path(__file__).resolve().parents[2]  # where this tocom was imported from


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _tocom_version() -> str | None:
    """The version of the imported tocom: its checkout's pyproject.toml, else the installed metadata."""
    pyproject = _CHECKOUT / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib  # Python >= 3.11
        except ImportError:
            tomllib = None
        if tomllib is not None:
            project = tomllib.loads(pyproject.read_text()).get("project", {})
            if project.get("name") == "tocom":
                return project.get("version")
    return _version("tocom")


def _device_name(device: str | None) -> str:
    if device is None or not str(device).startswith("cuda"):
        return f"cpu ({platform.processor() or platform.machine()})"
    import torch

    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def provenance(device: str | None = None) -> dict:
    """Commit, dirty flag, package versions, Python, platform and device, for a results JSON.

    ``commit`` and ``dirty`` are None outside a git checkout; ``dirty`` ignores untracked files
    (results being written are untracked until committed). ``device`` is e.g. ``"cpu"`` or ``"cuda:0"``.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "versions": {"tocom": _tocom_version(), **{p: _version(p) for p in PACKAGES}},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": _device_name(device),
    }
