"""`grayproxy release run`: one release driven across a fleet of replicas (docs/fleets.md).

The pure engine (proxy/release.py) decides, as in the proxy (proxy/releases.py); this module
does, for a fleet instead of one process:

- weights go to every replica (proxy/fleet.py), each with If-Match of the generation this
  release left there (of a fresh read the first time, and for the baseline's way back): a
  replica changed behind the release's back, or one that does not answer, aborts the
  release, which gives the baseline all traffic again on every replica that answers;
- checks come from Prometheus: per interval, each version's finished requests, 5xx answers
  and p99 over the fleet's ``grayproxy_*`` series (``Prometheus.reading``);
- webhooks are asked and notified as the proxy does it (releases.py's helpers); an asked
  phase is awaited in place, notices go out in threads.

The replicas must not run a release of that service themselves (it would fight this one for
the weights): ``release run`` refuses to start if one does. Steps with ``approval: true`` are
refused too: nobody is there to approve. Ctrl-C or SIGTERM aborts: weights back to the
baseline on every replica, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import FrameType
from typing import Any, Final

import aiohttp

from proxy import fleet
from proxy.config import Config
from proxy.ctl import ControlCallFailed, ControlClient, Json, control_url, put_weights
from proxy.metrics import DURATION_BUCKETS
from proxy.release import (
    ACTIVE,
    PROMOTED,
    Abort,
    Action,
    Answered,
    Ask,
    Event,
    Measured,
    Notify,
    Outcome,
    Reading,
    Release,
    ReleaseSpec,
    SetWeights,
    Tick,
    advance,
    release_json,
    start,
)
from proxy.release_ctl import progress, watch_line
from proxy.releases import (
    CLOSE_GRACE,
    PAUSE_ONLY_TICK,
    ask_webhooks,
    notify_webhooks,
    webhook_payload,
)

ACTOR: Final = "release run"
EXIT_PROMOTED: Final = 0
EXIT_NOT_PROMOTED: Final = 1  # rolled back or aborted
EXIT_REFUSED: Final = 2  # before anything changed: bad input, or a replica not ready for it
PROMETHEUS_TIMEOUT: Final = 10.0
# histogram_quantile answers +Inf past the last bucket: the last bound is what is known.
SLOWEST_MS: Final = DURATION_BUCKETS[-1] * 1000


class Refusal(Exception):
    """``release run`` does not start: why, one line each."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__(lines[0])
        self.lines = list(lines)


# ---- Prometheus --------------------------------------------------------------------------------


class PrometheusError(Exception):
    pass


class Prometheus:
    """Readings of one version over a time range, from the fleet's series in Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"<Prometheus {self.url}>"

    def reading(self, service: str, version: str, since: float, until: float) -> Reading:
        """The version's requests that finished between ``since`` and ``until`` on every
        replica: their count, the 5xx among them (an upstream failure is a 502 or 504 the
        client got) and their p99."""
        queries = reading_queries(service, version, until - since)
        requests, errors, p99 = (self.value(query, until) for query in queries)
        p99_ms = SLOWEST_MS if math.isinf(p99) else 0.0 if math.isnan(p99) else p99 * 1000
        return Reading(round(requests), round(errors), round(p99_ms, 3))

    def value(self, query: str, at: float) -> float:
        """An instant query's single value at ``at`` (0 when it has no series)."""
        params = urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
        try:
            with self._opener.open(
                f"{self.url}/api/v1/query?{params}", timeout=PROMETHEUS_TIMEOUT
            ) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                raise PrometheusError(f"{query}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{self.url}: {exc}") from None
        result = answer.get("data", {}).get("result") if answer.get("status") == "success" else None
        if not isinstance(result, list) or len(result) > 1:
            raise PrometheusError(f"{query}: not one value: {json.dumps(answer)[:300]}")
        return float(result[0]["value"][1]) if result else 0.0


def reading_queries(service: str, version: str, seconds: float) -> tuple[str, str, str]:
    """PromQL for a version's requests, errors and p99 (in seconds) over the last
    ``seconds``, summed over every replica."""
    labels = f"service={json.dumps(service)},version={json.dumps(version)}"
    window = f"[{max(1, round(seconds * 1000))}ms]"
    return (
        f"sum(increase(grayproxy_requests_total{{{labels}}}{window}))",
        f'sum(increase(grayproxy_requests_total{{{labels},code=~"5.."}}{window}))',
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(grayproxy_request_duration_seconds_bucket{{{labels}}}{window})))",
    )


# ---- the driver --------------------------------------------------------------------------------


class FleetRelease:
    """One release of ``service`` across the replicas at ``urls``."""

    def __init__(
        self,
        service: str,
        spec: ReleaseSpec,
        urls: Sequence[str],
        token: str | None,
        prometheus: Prometheus,
        *,
        out: Callable[[str], None] = lambda line: print(line, flush=True),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.spec = spec
        self.urls = tuple(urls)
        self.token = token
        self.prometheus = prometheus
        self.out = out
        self.clock = clock
        self.release: Release | None = None
        self.window_start = clock()  # the current check's interval starts here
        self._shown: tuple[Any, ...] | None = None
        self._generations: dict[str, str] = {}  # replica -> the generation it left there
        self._notices: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<FleetRelease {self.release!r} on {len(self.urls)} replicas>"

    # ------------------------------------------------------------------ before it starts

    def canary_share(self) -> float:
        """The canary's share on every replica now; Refusal if a replica cannot take part,
        the replicas disagree, or Prometheus does not answer."""
        answers = fleet.each(self.urls, self.token, self._inspect)
        lines = [f"{a.url}: {a.error.message}" for a in answers if a.error is not None]
        shares = {a.url: a.answer for a in answers if a.error is None}
        if not lines and len(set(shares.values())) > 1:
            lines = [f"{url}: {self.spec.canary} at {share:g}%" for url, share in shares.items()]
            lines.insert(0, f"the replicas disagree on {self.service}'s weights:")
        try:
            self.prometheus.value("vector(1)", self.clock())
        except PrometheusError as exc:
            lines.append(f"Prometheus does not answer: {exc}")
        if lines:
            raise Refusal([*lines, "nothing was changed"])
        return float(next(iter(shares.values())))

    def _inspect(self, client: ControlClient) -> float:
        path = f"/api/v1/services/{urllib.parse.quote(self.service, safe='')}"
        versions: Mapping[str, Any] = client.call("GET", path).get("versions") or {}
        for version in (self.spec.baseline, self.spec.canary):
            if version not in versions:
                raise ControlCallFailed(f"service {self.service!r} has no version {version!r}")
        try:
            own = client.call("GET", f"{path}/release")
        except ControlCallFailed as exc:
            if exc.status != 404:
                raise
        else:
            if own.get("state") in ACTIVE:
                raise ControlCallFailed(
                    f"it runs its own release of {own.get('canary')} in {self.service} "
                    f"({own.get('state')}): give the replicas a config without it, or abort it "
                    "there (grayproxy ctl release abort)"
                )
        weights = {name: float(v.get("weight") or 0) for name, v in versions.items()}
        total = sum(weights.values())
        return round(100 * weights[self.spec.canary] / total, 2) if total else 0.0

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Drive the release to its end: EXIT_PROMOTED, or EXIT_NOT_PROMOTED (also after
        Ctrl-C or SIGTERM, which abort it). Refusal if it cannot start."""
        share = self.canary_share()
        self.out(
            f"release of {self.spec.canary} in {self.service} on {len(self.urls)} replicas: "
            + ", ".join(self.urls)
        )
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._apply(start(self.service, self.spec, self.clock(), share))
            while self.release is not None and self.release.active:
                self._next()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the abort is not interrupted
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if self.release is not None and self.release.active:
                self._advance(Abort(ACTOR, why="interrupted (Ctrl-C or SIGTERM)"))
        finally:
            signal.signal(signal.SIGTERM, previous)
            for notice in self._notices:
                notice.join(CLOSE_GRACE)
        promoted = self.release is not None and self.release.state == PROMOTED
        return EXIT_PROMOTED if promoted else EXIT_NOT_PROMOTED

    def _next(self) -> None:
        """Wait for the next tick (the next check, with analysis) and feed it."""
        analysis = self.spec.analysis
        if analysis is None:
            time.sleep(PAUSE_ONLY_TICK)
            self._advance(Tick())
            return
        time.sleep(max(0.0, self.window_start + analysis.interval - self.clock()))
        now = self.clock()
        measured = self._measure(now)
        self.window_start = now  # a weight set while advancing starts it again
        if measured is not None:
            self._advance(measured, now)
        self._advance(Tick(), now)

    def _measure(self, now: float) -> Measured | None:
        since = self.window_start
        try:
            baseline = self.prometheus.reading(self.service, self.spec.baseline, since, now)
            canary = self.prometheus.reading(self.service, self.spec.canary, since, now)
        except PrometheusError as exc:
            self.out(f"{_clock()}  no check this interval: prometheus: {exc}")
            return None
        return Measured(since, baseline, canary)

    def _advance(self, event: Event, now: float | None = None) -> None:
        assert self.release is not None
        self._apply(advance(self.release, self.spec, self.clock() if now is None else now, event))

    def _apply(self, outcome: Outcome) -> None:
        """Take the engine's release and do its actions in order (an asked phase is fed
        back at once; a fleet that refuses weights aborts the release)."""
        self.release = outcome.release
        self._show()
        for action in outcome.actions:
            if not self._perform(action, outcome.release):
                return

    def _perform(self, action: Action, release: Release) -> bool:
        if isinstance(action, SetWeights):
            return self._set_weights(action.weights)
        payload = webhook_payload(release, self.spec, action.phase)
        if isinstance(action, Ask):
            self._advance(self._ask(action.phase, payload))
        elif isinstance(action, Notify):
            phase = action.phase
            notice = threading.Thread(
                target=_run_with_session,
                args=(lambda session: notify_webhooks(session, self.spec, phase, payload),),
                daemon=True,
            )
            notice.start()
            self._notices.append(notice)
        return True

    def _set_weights(self, weights: Mapping[str, float]) -> bool:
        """Every replica gets ``weights``; if one does not, the release is aborted (its
        abort sets the baseline's weights everywhere it can)."""
        answers = fleet.each(self.urls, self.token, lambda client: self._put(client, weights))
        self.window_start = self.clock()
        self._generations.update({a.url: a.generation for a in answers if a.generation})
        shown = " ".join(f"{name}={weight:g}" for name, weight in weights.items())
        self.out(f"{_clock()}  weights {shown}:")
        for line in fleet.change_report(answers).splitlines():
            self.out(f"  {line}")
        missed = fleet.failed(answers)
        if not missed:
            return True
        if self.release is not None and self.release.active:
            why = f"weights not applied on {len(missed)} of {len(self.urls)} replicas"
            self._advance(Abort(ACTOR, why=why))
        return False

    def _put(self, client: ControlClient, weights: Mapping[str, float]) -> Json:
        """A step's weights only where nothing changed since this release's last change
        there (If-Match of the generation it left); the baseline's back whatever changed."""
        args = argparse.Namespace(service=self.service, weights=dict(weights), if_match=None)
        left = self._generations.get(client.base_url)
        if left is None or not weights.get(self.spec.canary):
            return fleet.guarded(client, put_weights, args)
        args.if_match = left
        return put_weights(client, args)

    def _ask(self, phase: str, payload: Json) -> Answered:
        answered: Answered = _run_with_session(
            lambda session: ask_webhooks(session, self.spec, phase, payload)
        )
        return answered

    def _show(self) -> None:
        """A line whenever the release's state, step, weight, reason or last check moved."""
        assert self.release is not None
        shown = release_json(self.release, self.spec)
        key = progress(shown)
        if key != self._shown:
            self._shown = key
            self.out(watch_line(shown))


def _run_with_session(work: Callable[[aiohttp.ClientSession], Coroutine[Any, Any, Any]]) -> Any:
    async def with_session() -> Any:
        async with aiohttp.ClientSession() as session:
            return await work(session)

    return asyncio.run(with_session())


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _clock() -> str:
    return time.strftime("%H:%M:%S")


# ---- the command -------------------------------------------------------------------------------


def run(config: Config, args: argparse.Namespace) -> int:
    """`grayproxy release run`: the release of ``args.service`` in ``config`` across the
    fleet at ``args.url``, checked in Prometheus at ``args.prometheus``."""
    try:
        spec = release_of(config, args.service)
        targets = fleet.resolve(control_url(args))
        token = os.environ.get("GRAYPROXY_TOKEN") or None
        driver = FleetRelease(args.service, spec, targets.urls, token, Prometheus(args.prometheus))
        return driver.run()
    except ControlCallFailed as exc:
        lines = [exc.message, *exc.details]
    except Refusal as exc:
        lines = exc.lines
    print(f"grayproxy release run: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    return EXIT_REFUSED


def release_of(config: Config, name: str) -> ReleaseSpec:
    """The service's release in the config, if ``release run`` can drive it; Refusal."""
    services = {service.name: service for service in config.services}
    if name not in services:
        raise Refusal([f"no service {name!r} in the config (services: {', '.join(services)})"])
    spec = services[name].release
    if spec is None:
        raise Refusal([f"service {name!r} has no release section in the config"])
    approvals = [str(index + 1) for index, step in enumerate(spec.steps) if step.approval]
    if approvals:
        raise Refusal(
            [
                f"step {', '.join(approvals)} of the release wants approval: release run has "
                "nobody to ask",
                "gate the step with a confirm-step webhook instead (docs/fleets.md)",
            ]
        )
    return spec
