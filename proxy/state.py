"""The live snapshot (config + router + generation), swapped whole.

Every change validates first, builds a complete new Config and Router, then
replaces ``LiveState.snapshot`` in one assignment. The data plane reads
``snapshot`` once per request, so a request sees either the old or the new
state, never a mix. A refused change raises and leaves everything untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.config import Config, ConfigError, Service, check_weights, load_config
from proxy.routing import Router

log = logging.getLogger(__name__)

STATIC_SETTINGS = ("listen", "workers", "control")


class ControlError(Exception):
    """A refused control request; ``status`` is the HTTP status it becomes."""

    status = 400

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidRequest(ControlError):
    status = 400


class UnknownService(ControlError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown service {name!r}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    config: Config
    router: Router
    # Static settings the config file changed but this process still runs with
    # (set by a reload, carried by later changes until a reload clears them).
    warnings: tuple[str, ...] = ()


class LiveState:
    """The one mutable holder of the live configuration of a worker."""

    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config_path = config_path
        self.snapshot = Snapshot(1, config, Router(config.services))
        self._subscribers: list[Callable[[Snapshot], None]] = []

    def __repr__(self) -> str:
        snapshot = self.snapshot
        return (
            f"<LiveState [generation {snapshot.generation} | "
            f"{len(snapshot.config.services)} services | {self.config_path or 'embedded'}]>"
        )

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` after every swap."""
        self._subscribers.append(callback)

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

    def reload(self) -> Snapshot:
        """Re-read the config file; its weights replace runtime weight changes.

        Static settings (listen, workers, control) keep their running values;
        a difference is reported in ``Snapshot.warnings`` and logged.
        ConfigError if the file is refused: nothing changes then.
        """
        if self.config_path is None:
            raise ConfigError(["reload: no config file; this process runs an embedded config"])
        loaded = load_config(self.config_path)
        running = self.snapshot.config
        changed = [
            name for name in STATIC_SETTINGS if getattr(loaded, name) != getattr(running, name)
        ]
        warnings = tuple(f"{name}: changed in the file; a restart applies it" for name in changed)
        for warning in warnings:
            log.warning("reload: %s", warning)
        kept = {name: getattr(running, name) for name in changed}
        return self._swap(replace(loaded, **kept), warnings)

    def install(self, config: Config, generation: int) -> Snapshot:
        """Adopt a config decided elsewhere: a worker following its supervisor."""
        return self._swap(config, (), generation)

    def _replace_weights(self, service: Service, weights: dict[str, float]) -> Snapshot:
        new_service = replace(service, split=replace(service.split, weights=weights))
        config = self.snapshot.config
        services = tuple(new_service if s is service else s for s in config.services)
        return self._swap(replace(config, services=services), self.snapshot.warnings)

    def _swap(
        self, config: Config, warnings: tuple[str, ...], generation: int | None = None
    ) -> Snapshot:
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
