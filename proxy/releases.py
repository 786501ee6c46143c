"""Releases in the proxy: the pure engine (proxy/release.py) driven by asyncio.

One task per active release ticks every ``analysis.interval`` (every
PAUSE_ONLY_TICK without analysis). With analysis, each tick refreshes the
counters (with workers, the supervisor gathers theirs: the control API's own
``refresh``), reads both versions' lifetime counts, and feeds the engine the
requests that finished since the last tick (``metrics.between``); then the
tick itself. Whatever the engine decides is done here, on the event loop:
weights through ``LiveState.set_weights`` (with workers every worker gets
them, as any weight change), webhook phases asked in tasks whose answer is
fed back as an event, notices sent in tasks with bounded retries that nothing
waits for. API commands (start, approve, pause, resume, abort) are events
too, applied at once.

When a step's weight is set between two ticks (a gate answered, an approval),
the task takes a fresh reading then and restarts its interval, so that the
next check covers that step alone.

Every change of a release's state, step or weight, and every command, is
reported to ``on_transition(service, before, after, actor)`` (JSON of the
release before and after; ``before`` is None for a start); actors are the
API's (``request["actor"]``), ``release`` for what the driver does itself,
``file`` for releases from the config. ``dump()`` and ``restore()`` carry
every release across a restart: a restored active release goes on at its
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import Any, Final

import aiohttp
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import Config, ConfigError, Service, check_weights
from proxy.errors import ControlRefused
from proxy.metrics import Cumulative, IntervalStats, Metrics, between
from proxy.release import (
    ABORT,
    APPROVE,
    PAUSE,
    RESUME,
    STATES,
    Abort,
    Action,
    Answered,
    Approve,
    Ask,
    Event,
    Measured,
    Notify,
    Pause,
    Reading,
    Refused,
    Release,
    ReleaseSpec,
    Resume,
    SetWeights,
    Tick,
    Webhook,
    advance,
    parse_release,
    release_from_state,
    release_json,
    release_state,
    spec_json,
    start,
)
from proxy.state import LiveState, check_precondition

log = logging.getLogger(__name__)

RELEASE_ACTOR: Final = "release"  # what a release does by itself
FILE_ACTOR: Final = "file"  # releases from the config file, and what a reload does to them
PAUSE_ONLY_TICK: Final = 0.1  # seconds between ticks of a release without analysis
RETRY_BACKOFF: Final = 0.5  # before a webhook's second attempt; doubles, up to RETRY_BACKOFF_MAX
RETRY_BACKOFF_MAX: Final = 10.0
CLOSE_GRACE: Final = 1.0  # notices still being sent get this long when the proxy stops
PAYLOAD_KEYS: Final = (
    "service",
    "phase",
    "state",
    "step",
    "weight",
    "canary",
    "baseline",
    "reason",
    "checks",
)

Json = dict[str, Any]
Transition = Callable[[str, Json | None, Json, str], None]


class NoRelease(Exception):
    """The service never had a release (the API's 404)."""

    def __init__(self, service: str) -> None:
        super().__init__(f"service {service!r} has no release")


def log_transition(service: str, before: Json | None, after: Json, actor: str) -> None:
    """The default ``on_transition``: one log line."""
    was = "started" if before is None else f"{before['state']} step {before['step'] + 1}"
    log.info(
        "release of %s in %s (%s): %s -> %s step %d of %d, canary %s%%: %s",
        after["canary"],
        service,
        actor,
        was,
        after["state"],
        after["step"] + 1,
        after["steps"],
        after["weight"],
        after["reason"],
    )


class _Entry:
    """One service's release (active or the last one) and what drives it."""

    __slots__ = ("previous", "rebase", "release", "spec", "task", "wake")

    def __init__(self, spec: ReleaseSpec, release: Release) -> None:
        self.spec = spec
        self.release = release
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # a weight set between ticks, or the release ended
        self.rebase = False  # take a fresh reading: a step's weight was set between ticks
        self.previous: tuple[float, Cumulative, Cumulative] | None = None  # the last reading


class Releases:
    """Every service's release: start, read, command; the tasks that drive them."""

    def __init__(
        self,
        state: LiveState,
        metrics: Metrics,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        on_transition: Transition | None = None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._refresh = refresh
        self._clock = clock
        # By default every transition is logged and is one applied change (audit, state file).
        self.on_transition = on_transition or self._record
        self._entries: dict[str, _Entry] = {}
        # The release each service had in the file when last read: a reload starts one
        # that is new or changed there.
        self._in_file = {s.name: s.release for s in state.snapshot.config.services}
        self._calls: set[asyncio.Task[None]] = set()  # webhooks asked and notices sent
        self._session: aiohttp.ClientSession | None = None
        state.on_reload(self._on_reload)
        metrics.add_collector(ReleaseCollector(self))

    def __repr__(self) -> str:
        active = sum(entry.release.active for entry in self._entries.values())
        return f"<Releases [{active} active | {len(self._entries)} services]>"

    # ------------------------------------------------------------------ the API

    def get(self, service: str) -> Json:
        """The service's active release, or its last one; NoRelease if it never had one."""
        self._state.service(service)  # UnknownService first
        entry = self._entries.get(service)
        if entry is None:
            raise NoRelease(service)
        return release_json(entry.release, entry.spec)

    def all(self) -> dict[str, Json]:
        """Every service's active or last release, by service name (none: not there)."""
        return {
            name: release_json(entry.release, entry.spec)
            for name, entry in sorted(self._entries.items())
        }

    def active(self, service: str) -> Release | None:
        entry = self._entries.get(service)
        return entry.release if entry is not None and entry.release.active else None

    def startable(self, service: str) -> Service:
        """The service, if a release can start there now: UnknownService, or Refused while
        one is active."""
        current = self._state.service(service)
        running = self.active(service)
        if running is not None:
            raise Refused(f"{describe(running)} is in progress; abort it first")
        return current

    def start(self, service: str, raw: object, actor: str) -> Json:
        """Start a release from its plain spec: see ``startable``; InvalidRelease (a
        ConfigError) with every problem of the spec."""
        current = self.startable(service)
        spec = parse_release(raw, [v.name for v in current.versions], current.baseline)
        check_precondition(self._state.snapshot.generation)  # If-Match, before anything moves
        self._begin(service, spec, actor)
        return self.get(service)

    def command(self, service: str, command: str, actor: str) -> Json:
        """approve, pause, resume or abort: Refused when it does not apply."""
        self._state.service(service)
        entry = self._entries.get(service)
        if entry is None:
            raise NoRelease(service)
        events: Mapping[str, Event] = {
            APPROVE: Approve(actor),
            PAUSE: Pause(actor),
            RESUME: Resume(actor),
            ABORT: Abort(actor),
        }
        check_precondition(self._state.snapshot.generation)  # If-Match, before anything moves
        self._apply(service, entry, events[command], actor, command=True)
        return release_json(entry.release, entry.spec)

    def abort_for_change(self, service: str, actor: str, why: str) -> None:
        """Abort the active release, leaving the weights to the change that follows."""
        entry = self._entries.get(service)
        if entry is not None and entry.release.active:
            check_precondition(self._state.snapshot.generation)
            self._apply(service, entry, Abort(actor, restore=False, why=why), actor, command=True)

    async def start_from_config(self) -> None:
        """Start the releases the config gives (not where one was restored)."""
        for service in self._state.snapshot.config.services:
            if service.release is not None and service.name not in self._entries:
                self._begin(service.name, service.release, FILE_ACTOR)

    async def close(self) -> None:
        """Stop every task; notices being sent get CLOSE_GRACE to finish."""
        for entry in self._entries.values():
            if entry.task is not None:
                entry.task.cancel()
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=CLOSE_GRACE)
        for call in list(self._calls):
            call.cancel()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ restarts

    def dump(self) -> Json:
        """Every release (active or last), as JSON-able data for ``restore``."""
        return {
            name: {
                "baseline": entry.spec.baseline,
                "spec": spec_json(entry.spec),
                "release": release_state(entry.release),
            }
            for name, entry in self._entries.items()
        }

    def restore(self, data: Mapping[str, Any]) -> list[str]:
        """Take the releases of a ``dump`` back: active ones go on at their step, with their
        weights (set again if the live ones differ). Call it on the event loop, before the
        control app starts (releases from the config then start only where none was
        restored). What no longer fits the config is skipped, with a log line; returns
        those lines."""
        skipped = []
        for name, saved in data.items():
            try:
                self._restore_one(name, saved)
            except (ConfigError, ControlRefused, KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    why = "; ".join(exc.errors)
                else:
                    why = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                skipped.append(f"release of service {name!r} not restored: {why}")
                log.warning("%s", skipped[-1])
        return skipped

    def _restore_one(self, name: str, saved: Mapping[str, Any]) -> None:
        service = self._state.service(name)
        versions = [v.name for v in service.versions]
        spec = parse_release(saved["spec"], versions, str(saved["baseline"]))
        if spec.baseline not in versions:
            raise ValueError(f"its baseline {spec.baseline!r} is no longer a version")
        release = release_from_state(saved["release"])
        # A question asked before the restart is asked again.
        release = replace(release, asking=False, ask_at=min(release.ask_at, self._clock()))
        entry = _Entry(spec, release)
        self._entries[name] = entry
        if release.active:
            if release.applied:
                weights = check_weights(service, spec.weights(release.weight))
                if dict(service.split.weights) != weights:
                    self._state.set_weights(name, weights)
            self._drive_later(name, entry)

    # ------------------------------------------------------------------ driving

    def _begin(self, service: str, spec: ReleaseSpec, actor: str) -> None:
        outcome = start(service, spec, self._clock(), self._share(service, spec.canary))
        entry = _Entry(spec, outcome.release)
        previous = self._entries.get(service)
        if previous is not None and previous.task is not None:
            previous.task.cancel()
        self._entries[service] = entry
        self._report(service, None, entry, actor)
        self._perform(service, entry, outcome.actions)
        if entry.release.active:
            self._drive_later(service, entry)

    def _drive_later(self, service: str, entry: _Entry) -> None:
        entry.task = asyncio.get_running_loop().create_task(self._drive(service, entry))

    def _share(self, service: str, version: str) -> float:
        weights = self._state.service(service).split.weights
        total = sum(weights.values())
        return round(100 * weights.get(version, 0.0) / total, 2) if total else 0.0

    def _apply(
        self,
        service: str,
        entry: _Entry,
        event: Event,
        actor: str,
        *,
        now: float | None = None,
        command: bool = False,
    ) -> None:
        """Feed one event to the engine and do what it decides. Refused (for a command
        that does not apply) propagates; anything for a replaced release is dropped."""
        if self._entries.get(service) is not entry:
            return
        before = entry.release
        outcome = advance(before, entry.spec, self._clock() if now is None else now, event)
        entry.release = outcome.release
        if command or _moved(before, outcome.release):
            self._report(service, before, entry, actor)
        self._perform(service, entry, outcome.actions)
        if not entry.release.active:
            entry.wake.set()

    def _perform(self, service: str, entry: _Entry, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SetWeights):
                if not self._set_weights(service, entry, action.weights):
                    return
            elif isinstance(action, Ask):
                self._spawn(self._ask(service, entry, action.phase, self._payload(entry, action)))
            elif isinstance(action, Notify):
                self._spawn(self._notify(entry, action.phase, self._payload(entry, action)))

    def _set_weights(self, service: str, entry: _Entry, weights: Mapping[str, float]) -> bool:
        try:
            self._state.set_weights(service, dict(weights), actor=RELEASE_ACTOR)
        except (ConfigError, ControlRefused) as exc:
            why = "; ".join(exc.errors) if isinstance(exc, ConfigError) else exc.message
            log.error("release of %s in %s: weights refused: %s", entry.spec.canary, service, why)
            if entry.release.active:
                abort = Abort(RELEASE_ACTOR, restore=False, why=f"its weights were refused: {why}")
                self._apply(service, entry, abort, RELEASE_ACTOR)
            return False
        entry.rebase = True
        entry.wake.set()
        return True

    async def _drive(self, service: str, entry: _Entry) -> None:
        """Tick until the release is over (or replaced)."""
        analysis = entry.spec.analysis
        period = analysis.interval if analysis is not None else PAUSE_ONLY_TICK
        loop = asyncio.get_running_loop()
        try:
            if analysis is not None:
                await self._measure(service, entry)
            due = loop.time() + period
            while self._driving(service, entry):
                entry.wake.clear()
                if not entry.rebase:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(entry.wake.wait(), max(0.0, due - loop.time()))
                if not self._driving(service, entry):
                    break
                if entry.rebase and analysis is not None:
                    await self._measure(service, entry)  # the step's checks start now
                    due = loop.time() + period
                    continue
                entry.rebase = False
                if loop.time() < due:
                    continue
                due = max(due + period, loop.time())
                await self._tick(service, entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("release of %s in %s: driver failed", entry.spec.canary, service)
            if entry.release.active:
                why = "its driver failed; see the grayproxy log"
                self._apply(service, entry, Abort(RELEASE_ACTOR, why=why), RELEASE_ACTOR)

    def _driving(self, service: str, entry: _Entry) -> bool:
        return entry.release.active and self._entries.get(service) is entry

    async def _tick(self, service: str, entry: _Entry) -> None:
        if entry.spec.analysis is None:
            self._apply(service, entry, Tick(), RELEASE_ACTOR)
            return
        measured, now = await self._measure(service, entry)
        if measured is not None:
            self._apply(service, entry, measured, RELEASE_ACTOR, now=now)
        self._apply(service, entry, Tick(), RELEASE_ACTOR, now=now)
        entry.rebase = False  # this reading is the next check's start: it covers any new step

    async def _measure(self, service: str, entry: _Entry) -> tuple[Measured | None, float]:
        """Read both versions' counts now; the requests since the last reading, if any."""
        if self._refresh is not None:
            await self._refresh()
        now = self._clock()
        baseline = self._metrics.version(service, entry.spec.baseline).cumulative()
        canary = self._metrics.version(service, entry.spec.canary).cumulative()
        previous, entry.previous = entry.previous, (now, baseline, canary)
        entry.rebase = False
        if previous is None:
            return None, now
        since, baseline_before, canary_before = previous
        measured = Measured(
            since,
            _reading(between(baseline_before, baseline)),
            _reading(between(canary_before, canary)),
        )
        return measured, now

    # ------------------------------------------------------------------ webhooks

    def _payload(self, entry: _Entry, action: Ask | Notify) -> Json:
        return webhook_payload(entry.release, entry.spec, action.phase)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _ask(self, service: str, entry: _Entry, phase: str, payload: Json) -> None:
        answered = await ask_webhooks(self._http(), entry.spec, phase, payload)
        self._apply(service, entry, answered, RELEASE_ACTOR)

    async def _notify(self, entry: _Entry, phase: str, payload: Json) -> None:
        await notify_webhooks(self._http(), entry.spec, phase, payload)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()  # trust_env off: no proxy from the env
        return self._session

    # ------------------------------------------------------------------ reloads

    def _on_reload(self, config: Config) -> tuple[Config, list[str]]:
        """A reload keeps an active release and its weights (and says so); a release the
        file no longer fits is aborted; one new or changed in the file starts after it."""
        services = {service.name: service for service in config.services}
        warnings: list[str] = []
        for name, entry in list(self._entries.items()):
            if entry.release.active:
                kept, warning = self._keep(name, entry, services.get(name))
                if kept is not None:
                    services[name] = kept
                warnings.append(warning)
        for service in config.services:
            started = self._file_release(service)
            if started:
                warnings.append(started)
        return replace(config, services=tuple(services.values())), warnings

    def _keep(self, name: str, entry: _Entry, target: Service | None) -> tuple[Service | None, str]:
        release = entry.release
        what = f"services.{name}: {describe(release)}"
        names = [version.name for version in target.versions] if target is not None else []
        missing = [v for v in (release.baseline, release.canary) if v not in names]
        if target is None or missing:
            gone = "the service" if target is None else f"version {missing[0]!r}"
            why = f"reload: {gone} is no longer in the file"
            self._apply(name, entry, Abort(FILE_ACTOR, restore=False, why=why), FILE_ACTOR)
            return None, f"{what} is aborted: {gone} is no longer in the file"
        if not release.applied:
            return None, f"{what} goes on"
        weights = check_weights(target, entry.spec.weights(release.weight))
        kept = replace(target, split=replace(target.split, weights=weights))
        return kept, f"{what} keeps its weights ({release.canary} {release.weight:g}%)"

    def _file_release(self, service: Service) -> str | None:
        spec, before = service.release, self._in_file.get(service.name)
        self._in_file[service.name] = spec
        if spec is None or spec == before:
            return None
        running = self.active(service.name)
        if running is not None:
            return (
                f"services.{service.name}.release: changed in the file; {describe(running)} "
                "goes on (abort it to start the file's)"
            )
        # After the swap: the release sets its weights on the reloaded config.
        asyncio.get_running_loop().call_soon(self._begin_from_file, service.name, spec)
        return f"services.{service.name}.release: new in the file; it starts"

    def _begin_from_file(self, name: str, spec: ReleaseSpec) -> None:
        if self.active(name) is None and self._in_file.get(name) == spec:
            try:
                self._begin(name, spec, FILE_ACTOR)
            except ControlRefused as exc:  # the service is gone meanwhile
                log.warning("release of %s in %s not started: %s", spec.canary, name, exc)

    # ------------------------------------------------------------------ reporting

    def _report(self, service: str, before: Release | None, entry: _Entry, actor: str) -> None:
        spec = entry.spec
        shown_before = None if before is None else release_json(before, spec)
        try:
            self.on_transition(service, shown_before, release_json(entry.release, spec), actor)
        except Exception:
            log.exception("release of %s in %s: on_transition failed", spec.canary, service)

    def _record(self, service: str, before: Json | None, after: Json, actor: str) -> None:
        log_transition(service, before, after, actor)
        shown = ("state", "step", "weight", "reason", "failures")
        self._state.record(
            "release",
            service,
            None if before is None else {key: before[key] for key in shown},
            {key: after[key] for key in shown},
            actor,
        )

    def states(self) -> list[tuple[str, Release]]:
        """(service, its release) for every service that had one, by service name."""
        return sorted((name, entry.release) for name, entry in self._entries.items())


def describe(release: Release) -> str:
    """`the release of canary in web (progressing, step 2, canary 25%)`."""
    return (
        f"the release of {release.canary} in {release.service} ({release.state}, step "
        f"{release.step + 1}, canary {release.weight:g}%)"
    )


def _moved(before: Release, after: Release) -> bool:
    """A change worth reporting: of state, step, weight or approval."""
    fields = ("state", "step", "weight", "approved")
    return any(getattr(before, name) != getattr(after, name) for name in fields)


def _reading(interval: IntervalStats) -> Reading:
    return Reading(interval.requests, interval.errors, interval.p99_ms)


def webhook_payload(release: Release, spec: ReleaseSpec, phase: str) -> Json:
    """What a webhook of ``phase`` is sent about ``release`` (docs/releases.md)."""
    shown = release_json(release, spec)
    shown["phase"] = phase
    return {key: shown[key] for key in PAYLOAD_KEYS}


async def ask_webhooks(
    session: aiohttp.ClientSession, spec: ReleaseSpec, phase: str, payload: Json
) -> Answered:
    """Call the phase's webhooks in order until one refuses: the answer for the engine."""
    answers = []
    for hook in spec.hooks(phase):
        ok, detail = await call_webhook(session, hook, payload)
        answers.append(detail)
        if not ok:
            return Answered(phase, False, detail)
    return Answered(phase, True, "; ".join(answers))


async def notify_webhooks(
    session: aiohttp.ClientSession, spec: ReleaseSpec, phase: str, payload: Json
) -> None:
    """Send the phase's notices; one not delivered is logged."""
    for hook in spec.hooks(phase):
        ok, detail = await call_webhook(session, hook, payload)
        if not ok:
            log.warning("release of %s: %s notice not delivered: %s", spec.canary, phase, detail)


async def call_webhook(
    session: aiohttp.ClientSession, hook: Webhook, payload: Json
) -> tuple[bool, str]:
    """POST the payload, trying 1 + ``hook.retries`` times: (answered 2xx, what happened)."""
    backoff = RETRY_BACKOFF
    for attempt in range(hook.retries + 1):
        if attempt:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX)
        ok, detail = await _post(session, hook, payload)
        if ok:
            break
    if hook.retries and not ok:
        detail += f" ({hook.retries + 1} attempts)"
    return ok, detail


async def _post(session: aiohttp.ClientSession, hook: Webhook, payload: Json) -> tuple[bool, str]:
    timeout = aiohttp.ClientTimeout(total=hook.timeout)
    try:
        async with session.post(hook.url, json=payload, timeout=timeout) as response:
            return 200 <= response.status < 300, f"{hook.url} answered {response.status}"
    except TimeoutError:
        return False, f"{hook.url} did not answer within {hook.timeout:g}s"
    except aiohttp.ClientError as exc:
        return False, f"{hook.url} failed: {exc or type(exc).__name__}"


class ReleaseCollector(Collector):
    """grayproxy_release_state and grayproxy_release_step, read at scrape time."""

    def __init__(self, releases: Releases) -> None:
        self._releases = releases

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "grayproxy_release_state",
            "1 for the state of the service's release (the active one, else the last one).",
            labels=("service", "state"),
        )
        step = GaugeMetricFamily(
            "grayproxy_release_step",
            "The index (from 0) of the release's current step.",
            labels=("service",),
        )
        for service, release in self._releases.states():
            for name in STATES:
                state.add_metric([service, name], 1.0 if release.state == name else 0.0)
            step.add_metric([service], float(release.step))
        return [state, step]
