"""Build hook: compile the data path with mypyc.

The modules a request runs through are plain, fully typed Python; mypyc turns
them into C extensions, which halves the instructions each request costs
(`python -m bench.instructions`). Everything else stays interpreted. Without a
C compiler or Python's headers, or with GRAYPROXY_PURE=1, the same code is
installed to run interpreted: correct, but slower.
"""

import os
import shutil
import sys
import sysconfig

from setuptools import setup

# The modules on the data path, compiled together (they call each other).
HOT_PATH = [
    "proxy/errors.py",
    "proxy/http1.py",
    "proxy/routing.py",
    "proxy/requestid.py",
    "proxy/accesslog.py",
    "proxy/metrics.py",
    "proxy/plan.py",
    "proxy/upstream.py",
    "proxy/endpoints.py",
    "proxy/dataplane.py",
    "proxy/mirror.py",
]


def missing_for_compiling() -> str | None:
    """What a compiled build lacks here, or None."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        return f"no Python headers ({headers})"
    return None


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("GRAYPROXY_PURE"):
        return []
    missing = missing_for_compiling()
    if missing is not None:
        print(
            f"grayproxy: {missing}: installing the data path interpreted (about half as fast);"
            " install gcc and the Python headers for the compiled build",
            file=sys.stderr,
        )
        return []
    from mypyc.build import mypycify

    return mypycify(HOT_PATH, opt_level="3", group_name="proxy")


setup(ext_modules=ext_modules())
