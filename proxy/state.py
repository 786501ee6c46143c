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

Change safety (docs/change-safety.md): every applied change (weights, promote,
rollback, reload, and what other modules report through ``record``) raises the
generation by one, leaves an AuditRecord (proxy/audit.py) and, with a state file
attached, is written to it (proxy/statefile.py). A change made under an
If-Match (``IF_MATCH``, set by the control API for its request) is checked
against the generation in the same synchronous step that applies it, after the
change was validated and with no await in between: nothing can land between the
check and the swap.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from proxy import statefile
from proxy.audit import AuditLog, AuditRecord, now_text
from proxy.config import Config, ConfigError, Service, check_weights
from proxy.errors import UnknownService
from proxy.loader import load_config
from proxy.routing import Router

log = logging.getLogger(__name__)

STATIC_SETTINGS = ("listen", "workers", "control", "tls", "state_file")
DEFAULT_ACTOR = "admin"  # who changes things when the control API has no token


class PreconditionFailed(Exception):
    """A change asked for under an If-Match the live generation no longer matches;
    nothing was changed."""

    def __init__(self, condition: str, generation: int) -> None:
        super().__init__(f"If-Match {condition} does not match generation {generation}")
        self.condition = condition
        self.generation = generation


@dataclass(slots=True)
class Precondition:
    """An If-Match: the generations a change was based on (None: ``*``, any).

    The first change applied in its context checks it, and settles it: the other
    changes of the same request (an abort, then weights) are part of that change.
    Only changes made by ``task`` (the request's own) are checked: a task the
    handler starts inherits the context, and its later changes are not the request's."""

    condition: str  # as the client sent it, for the message
    generations: frozenset[int] | None
    settled: bool = False
    task: object = None  # the asyncio task of the request; None: any

    def holds(self, generation: int) -> bool:
        return self.generations is None or generation in self.generations


# The If-Match of the control-API request being handled, if any (proxy/control.py sets it).
IF_MATCH: ContextVar[Precondition | None] = ContextVar("grayproxy_if_match", default=None)


def check_precondition(generation: int) -> None:
    """Raise PreconditionFailed if the change about to apply on ``generation`` was asked
    for under an If-Match that does not hold; call with no await before the swap."""
    precondition = IF_MATCH.get()
    if precondition is None or precondition.settled:
        return
    if precondition.task is not None and precondition.task is not _current_task():
        return
    if not precondition.holds(generation):
        raise PreconditionFailed(precondition.condition, generation)
    precondition.settled = True


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
        self.audit = AuditLog()
        self._writer: statefile.StateFileWriter | None = None
        self._persisted: dict[str, Callable[[], object]] = {}
        self._restored: dict[str, object] = {}
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

    def set_weights(self, service: str, raw: object, *, actor: str = DEFAULT_ACTOR) -> Snapshot:
        """Replace the split weights of one service; ConfigError if ``raw`` is invalid."""
        current = self.service(service)
        return self._replace_weights(current, check_weights(current, raw), "weights", actor)

    def promote(self, service: str, version: object, *, actor: str = DEFAULT_ACTOR) -> Snapshot:
        """Send all of the service's traffic to ``version``."""
        current = self.service(service)
        names = [v.name for v in current.versions]
        if version not in names:
            raise ConfigError([f"version: unknown version {version!r}; known: {', '.join(names)}"])
        return self._replace_weights(current, _all_to(names, str(version)), "promote", actor)

    def rollback(self, service: str, *, actor: str = DEFAULT_ACTOR) -> Snapshot:
        """Send all of the service's traffic back to its baseline."""
        current = self.service(service)
        weights = _all_to([v.name for v in current.versions], current.baseline)
        return self._replace_weights(current, weights, "rollback", actor)

    def record(
        self, action: str, service: str | None, before: object, after: object, actor: str
    ) -> Snapshot:
        """An applied change that is not a weight change (a release's transition): the
        generation rises by one, the audit records it, the state file gets it.

        ``before`` and ``after`` must be JSON values (they are copied); TypeError if not."""
        before, after = _json_copy(before), _json_copy(after)
        snapshot = self.snapshot
        check_precondition(snapshot.generation)
        changed = self._swap(snapshot.config, snapshot.warnings, router=snapshot.router)
        self._audited(changed, action, service, before, after, actor)
        return changed

    # ---------------------------------------------------------------- the state file

    def attach_state_file(self, path: str) -> None:
        """Restore what the state file at ``path`` holds, and write it after every change
        from now on. Call once, at start, before serving and before other modules call
        ``restored``. An unusable file is logged and left for the next write to replace."""
        statefile.remove_leftovers(path)
        self._writer = statefile.StateFileWriter(path, self._saved_state)
        try:
            saved = statefile.read(path)
        except statefile.StateFileError as exc:
            log.error(
                "state file %s: cannot be used: %s; starting from the config file's state",
                path,
                exc,
            )
            return
        if saved is None:
            log.info("state file %s: none yet; it is written at the first change", path)
            return
        self._restore(path, saved)

    def add_persisted(self, name: str, dump: Callable[[], object]) -> None:
        """Keep section ``name`` in the state file: ``dump()`` is called on the event loop at
        every write and returns a JSON value that it does not change afterwards."""
        self._persisted[name] = dump

    def restored(self, name: str) -> object | None:
        """What the state file held for section ``name`` at start, or None."""
        return self._restored.get(name)

    async def written(self, generation: int) -> None:
        """Return once the state file holds ``generation`` or newer (a write was attempted);
        at once without a state file."""
        if self._writer is not None:
            await self._writer.written(generation)

    async def flush(self) -> None:
        """Wait for the state file writes asked for so far (at shutdown)."""
        if self._writer is not None:
            await self._writer.flush()

    def _restore(self, path: str, saved: statefile.SavedState) -> None:
        self.audit.restore(saved.audit)
        self._restored = dict(saved.sections)
        current = self.snapshot
        restored = statefile.restore_weights(current.config.services, saved.services)
        for message in restored.messages:
            log.warning("state file %s: %s", path, message)
        config = replace(current.config, services=restored.services)
        # One more than the file's: what a client saw before the restart is never shown again
        # for a state that may differ (the config file may have won for some service).
        generation = max(saved.generation, current.generation) + 1
        snapshot = self._swap(config, current.warnings, generation)
        before = {"generation": saved.generation}
        after = {
            "generation": generation,
            "restored": list(restored.kept),
            "config_file_wins": list(restored.config_wins),
        }
        log.info(
            "state file %s: restored generation %d (weights of %s); now generation %d",
            path,
            saved.generation,
            ", ".join(restored.kept) or "no service",
            generation,
        )
        self._audited(snapshot, "restart", None, before, after, "file")

    def _saved_state(self) -> statefile.SavedState:
        snapshot = self.snapshot
        services = {
            service.name: statefile.SavedService(service.source_digest, service.split.weights)
            for service in snapshot.config.services
        }
        sections = dict(self._restored)  # a section no module claims (yet) is kept as it was
        for name, dump in self._persisted.items():
            try:
                sections[name] = dump()
            except Exception:
                log.exception("state file: section %r could not be saved", name)
        return statefile.SavedState(
            snapshot.generation, services, tuple(self.audit.records()), sections
        )

    def _audited(
        self,
        snapshot: Snapshot,
        action: str,
        service: str | None,
        before: object,
        after: object,
        actor: str,
    ) -> None:
        """Record the change that made ``snapshot``, and have the state file written."""
        record = AuditRecord(snapshot.generation, now_text(), actor, action, service, before, after)
        self.audit.add(record)
        if self._writer is not None:
            self._writer.schedule(snapshot.generation)

    async def reload(self, *, actor: str = DEFAULT_ACTOR) -> Snapshot:
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
            check_precondition(self.snapshot.generation)
            before = self.snapshot
            snapshot = self._adopt(loaded, router, asked_at)
            self._audited(
                snapshot,
                "reload",
                None,
                {"generation": before.generation},
                _reload_summary(before, snapshot),
                actor,
            )
            return snapshot

    def install(self, config: Config, generation: int, router: Router | None = None) -> Snapshot:
        """Adopt a config decided elsewhere: a worker following its supervisor.

        ``router``, if given, must have been built from ``config.services``."""
        return self._swap(config, (), generation, router)

    def _adopt(self, loaded: Config, router: Router, asked_at: int) -> Snapshot:
        """Swap in a config read from the file for a reload asked for at ``asked_at``."""
        running = self.snapshot.config
        started = self._static_in_file
        changed = [
            name
            for name in STATIC_SETTINGS
            if _static_value(loaded, name) != _static_value(started, name)
        ]
        warnings = [f"{name}: changed in the file; a restart applies it" for name in changed]
        kept = {name: getattr(running, name) for name in STATIC_SETTINGS}
        config = replace(loaded, **kept)  # the services, and so the router, are the file's
        config = _with_certificates(config, loaded)
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

    def _replace_weights(
        self,
        service: Service,
        weights: dict[str, float],
        action: str = "weights",
        actor: str = DEFAULT_ACTOR,
    ) -> Snapshot:
        check_precondition(self.snapshot.generation)
        new_service = replace(service, split=replace(service.split, weights=weights))
        config = self.snapshot.config
        services = tuple(new_service if s is service else s for s in config.services)
        snapshot = self._swap(replace(config, services=services), self.snapshot.warnings)
        self._weights_changed_at[service.name] = snapshot.generation
        before, after = _weights_json(service.split.weights), _weights_json(weights)
        self._audited(snapshot, action, service.name, before, after, actor)
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


def _static_value(config: Config, name: str) -> object:
    """A static setting as a reload compares it: whether a listener speaks TLS
    is static, which certificate it serves is not (see _with_certificates)."""
    value = getattr(config, name)
    if name == "tls":
        return value is not None
    if name == "control":
        return replace(value, tls=None), value.tls is not None
    return value


def _with_certificates(config: Config, loaded: Config) -> Config:
    """``config`` serving the certificates ``loaded`` names, on the listeners that
    speak TLS in both: a reload re-reads them (rotation without a restart)."""
    if config.tls is not None and loaded.tls is not None:
        config = replace(config, tls=loaded.tls)
    control = config.control
    if control.tls is not None and loaded.control.tls is not None:
        config = replace(config, control=replace(control, tls=loaded.control.tls))
    return config


def _current_task() -> object:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop running
        return None


def _weights_json(weights: Mapping[str, float]) -> dict[str, float | int]:
    """90.0 reads as 90, 12.5 stays 12.5 (as the control API shows weights)."""
    return {name: int(w) if float(w).is_integer() else w for name, w in weights.items()}


def _json_copy(value: object) -> object:
    """A JSON value that no caller can change afterwards."""
    copied: object = json.loads(json.dumps(value))
    return copied


def _reload_summary(before: Snapshot, after: Snapshot) -> dict[str, object]:
    """A reload's audit ``after``: its generation, which services it added, removed or
    changed (anything in them, weights included), and its warnings."""
    old = {service.name: service for service in before.config.services}
    new = {service.name: service for service in after.config.services}
    return {
        "generation": after.generation,
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": [name for name in new if name in old and new[name] != old[name]],
        "warnings": list(after.warnings),
    }


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
