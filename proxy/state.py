"""The live snapshot (config + router + generation), swapped whole.

Every change validates first, builds a complete new Config and Router, then
replaces ``LiveState.snapshot`` in one assignment. The data plane reads
``snapshot`` once per request, so a request sees either the old or the new
state, never a mix. A refused change raises and leaves everything untouched.

A reload reads, parses and validates the file and builds its Router in a
thread (``asyncio.to_thread``): a config of a few megabytes is seconds of pure
Python, and on the event loop those seconds would stall every request of this
process. Only the swap runs on the loop. Reloads run one at a time, in the
order they were asked for; each reads the file when its turn comes.

A weight change (weights, promote, rollback) applied after a reload was asked
for is not lost to it, even while the reload reads the file or waits for an
earlier one: each weight change records its generation per service, and at
swap time every service changed after the reload was asked for keeps its
runtime weights on the reloaded config (versions the file added get 0), with a
warning saying so. If they no longer fit the file (the service, or a version
with weight, is gone), the file's weights apply and a warning says that. Weight
changes applied before the reload was asked for are replaced by the file's
weights, as a reload always does. The generation rises once per applied
change, the reload's swap after every change it carries; the Router is then
rebuilt on the loop (a carry is rare, and routing a config is cheap next to
parsing it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

from proxy.config import Config, ConfigError, Service, check_weights
from proxy.errors import UnknownService
from proxy.loader import load_config
from proxy.routing import Router

log = logging.getLogger(__name__)

STATIC_SETTINGS = ("listen", "workers", "control")
# Adjusts a reloaded config before the swap: (the config to swap in, warnings to add).
ReloadHook = Callable[[Config], tuple[Config, list[str]]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    config: Config
    router: Router
    # Where what runs differs from the file, as found by the last reload: static
    # settings that need a restart, weights changed while it read the file (set by
    # a reload, carried by later changes until the next reload replaces them).
    warnings: tuple[str, ...] = ()


class LiveState:
    """The one mutable holder of the live configuration of a worker."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        generation: int = 1,
        router: Router | None = None,
        as_in_file: Config | None = None,
    ) -> None:
        self.config_path = config_path
        # The static settings as the file gave them at start: a reload warns when
        # the file changes one (the running value, maybe a command line's, stays).
        self._static_in_file = as_in_file or config
        if router is None:
            router = Router(config.services)
        self.snapshot = Snapshot(generation, config, router)
        self._subscribers: list[Callable[[Snapshot], None]] = []
        self._reloading = asyncio.Lock()
        # Service name -> generation of its last runtime weight change (reloads carry later ones).
        self._weights_changed_at: dict[str, int] = {}
        self._reload_hooks: list[ReloadHook] = []

    def __repr__(self) -> str:
        snapshot = self.snapshot
        return (
            f"<LiveState [generation {snapshot.generation} | "
            f"{len(snapshot.config.services)} services | {self.config_path or 'embedded'}]>"
        )

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` after every swap."""
        self._subscribers.append(callback)

    def on_reload(self, hook: ReloadHook) -> None:
        """Let ``hook(config)`` adjust every config a reload is about to swap in (an active
        release keeps its weights): it returns the config to swap in and warnings to add."""
        self._reload_hooks.append(hook)

    def service(self, name: str) -> Service:
        """The live service called ``name``; UnknownService if there is none."""
        for service in self.snapshot.config.services:
            if service.name == name:
                return service
        raise UnknownService(name)

    def set_weights(self, service: str, raw: object) -> Snapshot:
        """Replace the split weights of one service; ConfigError if ``raw`` is invalid."""
        current = self.service(service)
        return self._replace_weights(current, check_weights(current, raw))

    def promote(self, service: str, version: object) -> Snapshot:
        """Send all of the service's traffic to ``version``."""
        current = self.service(service)
        names = [v.name for v in current.versions]
        if version not in names:
            raise ConfigError([f"version: unknown version {version!r}; known: {', '.join(names)}"])
        return self._replace_weights(current, _all_to(names, str(version)))

    def rollback(self, service: str) -> Snapshot:
        """Send all of the service's traffic back to its baseline."""
        current = self.service(service)
        return self._replace_weights(
            current, _all_to([v.name for v in current.versions], current.baseline)
        )

    async def reload(self) -> Snapshot:
        """Re-read the config file; its weights replace runtime weight changes made before.

        The file is read, parsed and validated, and its Router built, in a thread;
        the swap happens here, on the loop (see the module docstring for weight
        changes that land meanwhile). Static settings (listen, workers, control)
        keep their running values; a difference is reported in
        ``Snapshot.warnings`` and logged. ConfigError if the file is refused:
        nothing changes then.
        """
        path = self.config_path
        if path is None:
            raise ConfigError(["reload: no config file; this process runs an embedded config"])
        asked_at = self.snapshot.generation
        async with self._reloading:
            with loop_first():
                loaded, router = await asyncio.to_thread(load_and_route, path)
            return self._adopt(loaded, router, asked_at)

    def install(self, config: Config, generation: int, router: Router | None = None) -> Snapshot:
        """Adopt a config decided elsewhere: a worker following its supervisor.

        ``router``, if given, must have been built from ``config.services``."""
        return self._swap(config, (), generation, router)

    def _adopt(self, loaded: Config, router: Router, asked_at: int) -> Snapshot:
        """Swap in a config read from the file for a reload asked for at ``asked_at``."""
        running = self.snapshot.config
        started = self._static_in_file
        changed = [
            name for name in STATIC_SETTINGS if getattr(loaded, name) != getattr(started, name)
        ]
        warnings = [f"{name}: changed in the file; a restart applies it" for name in changed]
        kept = {name: getattr(running, name) for name in STATIC_SETTINGS}
        config = replace(loaded, **kept)  # the services, and so the router, are the file's
        moved = [
            service
            for service in running.services
            if self._weights_changed_at.get(service.name, 0) > asked_at
        ]
        if moved:
            services, carried = _carry_weights(config.services, moved)
            config = replace(config, services=services)
            router = Router(services)
            warnings += carried
        for hook in self._reload_hooks:
            adjusted, more = hook(config)
            if adjusted is not config:
                config, router = adjusted, Router(adjusted.services)
            warnings += more
        for warning in warnings:
            log.warning("reload: %s", warning)
        names = {service.name for service in config.services}
        self._weights_changed_at = {
            name: generation
            for name, generation in self._weights_changed_at.items()
            if name in names
        }
        return self._swap(config, tuple(warnings), router=router)

    def _replace_weights(self, service: Service, weights: dict[str, float]) -> Snapshot:
        new_service = replace(service, split=replace(service.split, weights=weights))
        config = self.snapshot.config
        services = tuple(new_service if s is service else s for s in config.services)
        snapshot = self._swap(replace(config, services=services), self.snapshot.warnings)
        self._weights_changed_at[service.name] = snapshot.generation
        return snapshot

    def _swap(
        self,
        config: Config,
        warnings: tuple[str, ...],
        generation: int | None = None,
        router: Router | None = None,
    ) -> Snapshot:
        if router is None:
            router = Router(config.services)
        if generation is None:
            generation = self.snapshot.generation + 1
        snapshot = Snapshot(generation, config, router, warnings)
        self.snapshot = snapshot
        for callback in self._subscribers:
            try:
                callback(snapshot)
            except Exception:
                # The swap is done; one failing subscriber must not hide it from the others.
                log.exception("snapshot subscriber %r failed", callback)
        return snapshot


def _all_to(names: list[str], chosen: str) -> dict[str, float]:
    return {name: 100.0 if name == chosen else 0.0 for name in names}


# While a thread parses a config, the interpreter lets the event loop's thread
# run after at most this long: the default, 5 ms, is waited for at each socket
# event (a 5 MB reload served 9x fewer GETs with it).
PARSE_SWITCH_INTERVAL = 0.0005


@contextmanager
def loop_first() -> Iterator[None]:
    """While a thread parses a config, keep the event loop going: the
    interpreter switches to it sooner, and no garbage collection runs. The
    parse makes millions of objects, and a full collection of them holds every
    thread (60-100 ms for 5 MB; 30-40 ms of GETs' worst latency without)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(PARSE_SWITCH_INTERVAL)
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
        if collecting:
            gc.enable()


def load_and_route(path: str) -> tuple[Config, Router]:
    """The heavy part of a reload, safe to run in a thread: read, parse, validate, route."""
    config = load_config(path)
    return config, Router(config.services)


def _carry_weights(
    loaded: tuple[Service, ...], moved: list[Service]
) -> tuple[tuple[Service, ...], list[str]]:
    """``loaded`` with the runtime weights of the ``moved`` services where they fit."""
    services = {service.name: service for service in loaded}
    warnings: list[str] = []
    for runtime in moved:
        what = f"services.{runtime.name}: weights changed during the reload"
        target = services.get(runtime.name)
        if target is None:
            warnings.append(f"{what} are dropped: the service is no longer in the file")
            continue
        names = {version.name for version in target.versions}
        wanted = {name: w for name, w in runtime.split.weights.items() if w or name in names}
        try:
            weights = check_weights(target, wanted)
        except ConfigError as exc:
            why = "; ".join(exc.errors)
            warnings.append(f"{what} do not fit the file ({why}); the file's weights apply")
            continue
        services[runtime.name] = replace(target, split=replace(target.split, weights=weights))
        warnings.append(f"{what} are kept: {_weights_text(weights)}")
    return tuple(services.values()), warnings


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {weight:g}" for name, weight in weights.items())
