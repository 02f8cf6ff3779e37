#!/usr/bin/env python3
"""Set up this checkout and run it: the two commands of the README.

    python3 dev.py up [kvsvr up options]   # a local 3-node cluster, in the foreground
    python3 dev.py test [pytest options]   # the whole test suite

Both create `.venv` on first use and (re)install the project into it when
`pyproject.toml` changed, so they work on a fresh machine with only python3.
Needs nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".kvsvr-installed"


def _pyproject_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_environment() -> None:
    if not PYTHON.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = _pyproject_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    print("installing kvsvr and its test tools into .venv ...", flush=True)
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True
    )
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test,harness]"],
        check=True,
    )
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test", "setup"):
        print(__doc__)
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "up":
        arguments = [str(PYTHON), "-m", "kvsvr", "up", *rest]
    else:
        arguments = [str(PYTHON), "-m", "pytest", *rest]
    os.chdir(ROOT)
    try:
        return subprocess.call(arguments)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
