"""Build hook: compile the data path with mypyc.

The modules a request runs through are plain, fully typed Python; mypyc turns
them into C extensions, which halves the instructions each request costs
(`python -m bench.instructions`). Everything else stays interpreted. Set
GRAYPROXY_PURE=1 to build without a C compiler: the same code then runs
interpreted, correct but slower.
"""

import os

from setuptools import setup

# The modules on the data path, compiled together (they call each other).
HOT_PATH = [
    "proxy/http1.py",
    "proxy/routing.py",
    "proxy/metrics.py",
    "proxy/upstreams.py",
    "proxy/dataplane.py",
]


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("GRAYPROXY_PURE"):
        return []
    from mypyc.build import mypycify

    return mypycify(HOT_PATH, opt_level="3", group_name="proxy")


setup(ext_modules=ext_modules())
