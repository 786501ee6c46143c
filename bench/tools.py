"""The outside programs the harness needs, installed with apt-get where missing."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

Say = Callable[[str], None]

# program -> Debian package
PROGRAMS = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "taskset": "util-linux"}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def add_sbin_to_path() -> None:
    """nginx and haproxy live in sbin directories that a non-root PATH may leave out."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([*path, *(d for d in SBIN_DIRS if d not in path)])


def ensure_programs(install: bool, say: Say = print) -> dict[str, str]:
    """Path of every program that is (or could be made) available; prints what it installs."""
    add_sbin_to_path()
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing and install:
        _apt_install(sorted({PROGRAMS[program] for program in missing}), say)
    return {program: path for program in PROGRAMS if (path := shutil.which(program))}


def _apt_install(packages: list[str], say: Say) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        say(f"cannot install {', '.join(packages)}: needs apt-get and root")
        return
    say(f"installing {', '.join(packages)} with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", *packages]
    if _quiet_run(command, env) != 0:
        say("apt-get install failed; running apt-get update and trying again ...")
        _quiet_run(["apt-get", "update", "-q"], env)
        if _quiet_run(command, env) != 0:
            say(f"apt-get could not install {', '.join(packages)}")


def _quiet_run(command: list[str], env: dict[str, str]) -> int:
    done = subprocess.run(command, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    return done.returncode


def program_version(command: list[str]) -> str:
    """The first line a `--version`-like command prints (nginx prints on stderr)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def matplotlib_pyplot(say: Say = print) -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, pip-installed into this Python if missing."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        say("matplotlib is missing: pip install matplotlib ...")
        command = [sys.executable, "-m", "pip", "install", "-q", "matplotlib"]
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
        if done.returncode != 0:
            say(f"could not install matplotlib ({done.stderr.strip()[-200:]}): no chart")
            return None
        importlib.invalidate_caches()
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        say(f"matplotlib does not import ({exc}): no chart")
        return None
