"""The optional compiled build; everything else about the package is in pyproject.toml.

By default the package is pure Python, as `make run` and `make test` install it. With
FOREWARN_COMPILE=1 a (non-editable) build compiles the modules a replay spends its time in with
mypyc, which ships with mypy; it needs mypy and a C compiler where it builds. `make compiled`
does it into a venv of its own (docs/benchmarks.md). An editable install is never compiled: a
compiled module beside its source would shadow every later edit of it.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# The hot paths of `forewarn replay`, of the server's ingest and of its engine, in flow order.
# Never a module defining msgspec Structs (they live in `records`), nor one that anything
# subclasses or patches at run time: compiled classes and functions are fixed.
COMPILED = (
    "ingest",
    "model",
    "sources",
    "expr",
    "playbook",
    "signals",
    "adaptive",
    "detect",
    "engine",
    "runner",
    "decide",
)


# setuptools commands that build: the others (egg_info, dist_info) only read metadata, and
# compiling for them would double the time a build takes
BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def _ext_modules() -> list[object]:
    if os.environ.get("FOREWARN_COMPILE", "") in ("", "0"):
        return []
    if "editable_wheel" in sys.argv or "develop" in sys.argv:
        sys.exit(
            "FOREWARN_COMPILE=1 is for a regular install or a wheel, not an editable install: "
            "use `make compiled`, or unset FOREWARN_COMPILE"
        )
    if not BUILDING.intersection(sys.argv):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("FOREWARN_COMPILE=1 needs mypy (mypyc ships with it) where the package builds")
    return list(mypycify([f"src/forewarn/{name}.py" for name in COMPILED], group_name="forewarn"))


setup(ext_modules=_ext_modules())
