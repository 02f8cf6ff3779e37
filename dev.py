#!/usr/bin/env python3
"""Set up this checkout and run it: the two commands of the README.

    python3 dev.py up [kvsvr up options]   # a local 3-node cluster, in the foreground
    python3 dev.py test [pytest options]   # the whole test suite
    python3 dev.py test --layer unit       # one layer: unit, sim(ulation) or process
    python3 dev.py compile                 # optional: build the hot modules with mypyc
    python3 dev.py uncompile               # back to pure Python

All create `.venv` on first use and (re)install the project into it when
`pyproject.toml` changed, so they work on a fresh machine with only python3.
Needs nothing but the standard library.

`compile` needs a C compiler and Python's headers (`apt-get install gcc
python3-dev`). It compiles the modules in `COMPILED_MODULES` in place with
mypyc (shipped with mypy, already in the test extra); Python then imports the
extension modules beside the sources instead of the sources. It records each
source's hash in `kvsvr/compiled-sources.json`, and `import kvsvr` refuses
to run compiled modules whose source has changed since (see
`kvsvr/_build.py`), so an edit is never silently shadowed by an old build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".kvsvr-installed"

# The node's hot path, compiled by `dev.py compile`: where a put or a get
# spends its Python time (wire envelopes, Paxos, row codec, storage, the
# node's request handling).
COMPILED_MODULES = [
    "kvsvr/api.py",
    "kvsvr/net/connection.py",
    "kvsvr/net/framing.py",
    "kvsvr/net/messages.py",
    "kvsvr/net/serving.py",
    "kvsvr/net/stream.py",
    "kvsvr/protocol/coordinator.py",
    "kvsvr/protocol/messages.py",
    "kvsvr/protocol/placement.py",
    "kvsvr/protocol/replica.py",
    "kvsvr/protocol/rounds.py",
    "kvsvr/protocol/state.py",
    "kvsvr/protocol/write_leases.py",
    "kvsvr/protocol/read_lease.py",
    "kvsvr/storage/codec.py",
    "kvsvr/storage/commit.py",
    "kvsvr/storage/decoded_rows.py",
    "kvsvr/storage/engine.py",
    "kvsvr/storage/environment.py",
    "kvsvr/node/cache.py",
    "kvsvr/node/client_api.py",
    "kvsvr/node/engine.py",
    "kvsvr/node/read_share.py",
    "kvsvr/node/replica_side.py",
    "kvsvr/node/rounds.py",
    "kvsvr/node/server.py",
    "kvsvr/node/write_queue.py",
    "kvsvr/node/writes.py",
]
MANIFEST = ROOT / "kvsvr" / "compiled-sources.json"

# `test --layer NAME`: the pytest marker of each layer (kvsvr_tests/layers.py).
TEST_LAYERS = {
    "unit": "unit",
    "sim": "simulation",
    "simulation": "simulation",
    "process": "process",
}


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
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test,harness]"],
        check=True,
    )
    STAMP.write_text(wanted)


def compiled_files() -> list[Path]:
    """Every extension module a `compile` left in the package (ours and
    mypyc's shared runtime library, kvsvr/_compiled__mypyc)."""
    return sorted((ROOT / "kvsvr").rglob("*.so"))


def uncompile() -> int:
    for path in compiled_files():
        path.unlink()
    MANIFEST.unlink(missing_ok=True)
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    print("compiled modules removed: kvsvr runs as pure Python")
    return 0


def compile_modules() -> int:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    include = subprocess.run(
        [str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if compiler is None or not (Path(include) / "Python.h").exists():
        print(
            "dev.py compile needs a C compiler and Python's headers "
            f"(missing: {'a C compiler' if compiler is None else include + '/Python.h'}); "
            "on Debian: apt-get install gcc python3-dev. kvsvr runs without them, "
            "as pure Python.",
            file=sys.stderr,
        )
        return 1
    uncompile()
    print(f"compiling {len(COMPILED_MODULES)} modules with mypyc (a minute or two) ...", flush=True)
    # mypyc's own command line puts its shared runtime library at the top level
    # (`<hash>__mypyc`), where an editable install cannot import it; a group
    # name inside the package puts it at kvsvr/_compiled__mypyc.
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    setup = build / "setup_compiled.py"
    setup.write_text(
        "from mypyc.build import mypycify\n"
        "from setuptools import setup\n\n"
        f"setup(name='kvsvr-compiled', script_args=['build_ext', '--inplace'], ext_modules="
        f"mypycify({COMPILED_MODULES!r}, group_name='kvsvr._compiled', opt_level='3'))\n"
    )
    done = subprocess.run([str(PYTHON), str(setup)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        uncompile()
        print("mypyc failed (output above); nothing compiled is left", file=sys.stderr)
        return 1
    hashes = {
        name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in COMPILED_MODULES
    }
    MANIFEST.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"compiled: {', '.join(COMPILED_MODULES)}")
    return 0


def pytest_arguments(arguments: list[str]) -> list[str] | None:
    """pytest's arguments for `dev.py test ARGUMENTS`: `--layer NAME` (or
    `--layer=NAME`) becomes `-m NAME`; None if the layer is unknown."""
    result: list[str] = []
    layers: list[str] = []
    rest = iter(arguments)
    for argument in rest:
        if argument == "--layer":
            layers.append(next(rest, ""))
        elif argument.startswith("--layer="):
            layers.append(argument.removeprefix("--layer="))
        else:
            result.append(argument)
    for layer in layers:
        if layer not in TEST_LAYERS:
            known = ", ".join(TEST_LAYERS)
            print(f"unknown test layer {layer!r}; one of: {known}", file=sys.stderr)
            return None
    if layers:
        result = ["-m", " or ".join(TEST_LAYERS[layer] for layer in layers), *result]
    return result


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test", "setup", "compile", "uncompile"):
        print(__doc__)
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "compile":
        return compile_modules()
    if command == "uncompile":
        return uncompile()
    if command == "up":
        arguments = [str(PYTHON), "-m", "kvsvr", "up", *rest]
    else:
        pytest_args = pytest_arguments(rest)
        if pytest_args is None:
            return 2
        arguments = [str(PYTHON), "-m", "pytest", *pytest_args]
    os.chdir(ROOT)
    try:
        return subprocess.call(arguments)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
