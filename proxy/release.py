"""The release engine: a grayscale release as a pure state machine.

A release moves the canary's share of a service through ``steps``, judges the
canary against the baseline once per ``analysis.interval`` on the requests
each version finished in that interval, asks webhooks (gates) before a step
changes a weight, and waits for a person where a step wants approval. It ends
``promoted`` (canary 100 %), ``rolled_back`` (too many failed checks: baseline
100 %) or ``aborted``.

This module only decides (h11's sans-I/O, httpcore's "decide, then do"): no
I/O, no clock, no tasks. ``start`` and ``advance(release, spec, now, event)``
return the next ``Release`` (a frozen value) and the *actions* the caller
performs: set weights, ask a webhook phase (whose answer comes back as an
``Answered`` event), send a notice. proxy/releases.py is that caller.

Each step goes through its *stages* in order (``step_stages``): approval (only
the promotion step, whose approval comes before its switch), its gates
(``confirm-step``, and for the promotion also ``confirm-promotion``), then
``running``: its weight is set and it lasts until its pause is over, the
step is approved (with ``approval: true``; the release waits for it once
the pause is over) and the latest check, covering only this step, passed
(with analysis). The last step is at 100 % and promotes as
soon as it is set. Which states may follow which, per event, is the table
``TRANSITIONS``; ``advance`` refuses to make any other move.

Comparisons are exact (fractions of the decimal values written in the spec),
so a canary exactly at a limit passes and one a hair above fails.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Final

from proxy.config import ConfigError, unknown_version, weight_problem

# ---------------------------------------------------------------------------- states

PROGRESSING: Final = "progressing"
WAITING: Final = "waiting"  # for approval or a gate
PAUSED: Final = "paused"  # by a person, or for lack of traffic
PROMOTED: Final = "promoted"
ROLLED_BACK: Final = "rolled_back"
ABORTED: Final = "aborted"
STATES: Final = (PROGRESSING, WAITING, PAUSED, PROMOTED, ROLLED_BACK, ABORTED)
ACTIVE: Final = frozenset({PROGRESSING, WAITING, PAUSED})
FINAL: Final = frozenset({PROMOTED, ROLLED_BACK, ABORTED})

# Event kinds, the keys of TRANSITIONS.
TICK: Final = "tick"
MEASURED: Final = "measured"
ANSWERED: Final = "answered"
APPROVE: Final = "approve"
PAUSE: Final = "pause"
RESUME: Final = "resume"
ABORT: Final = "abort"
COMMANDS: Final = (APPROVE, PAUSE, RESUME, ABORT)  # what people (the API) may ask for

# The states each event may lead to, per state; anything else is a bug (IllegalTransition).
# A final state has no entry: nothing moves a finished release.
TRANSITIONS: Final[Mapping[str, Mapping[str, frozenset[str]]]] = {
    PROGRESSING: {
        TICK: frozenset({PROGRESSING, WAITING, PROMOTED}),
        MEASURED: frozenset({PROGRESSING, WAITING, PAUSED, PROMOTED, ROLLED_BACK}),
        ANSWERED: frozenset({PROGRESSING, WAITING, PROMOTED, ABORTED}),
        APPROVE: frozenset({PROGRESSING, WAITING, PROMOTED}),
        PAUSE: frozenset({PAUSED}),
        ABORT: frozenset({ABORTED}),
    },
    WAITING: {
        TICK: frozenset({WAITING}),
        MEASURED: frozenset({WAITING, ROLLED_BACK}),
        ANSWERED: frozenset({PROGRESSING, WAITING, PROMOTED}),
        APPROVE: frozenset({PROGRESSING, WAITING, PROMOTED}),
        PAUSE: frozenset({PAUSED}),
        ABORT: frozenset({ABORTED}),
    },
    PAUSED: {
        TICK: frozenset({PAUSED}),
        MEASURED: frozenset({PAUSED, ROLLED_BACK}),
        ANSWERED: frozenset({PAUSED}),
        APPROVE: frozenset({PAUSED}),
        RESUME: frozenset({PROGRESSING, WAITING, PROMOTED}),
        ABORT: frozenset({ABORTED}),
    },
}
# The states a release may be in right after it started.
STARTS: Final = frozenset({PROGRESSING, WAITING, PROMOTED})
# The states in which a command applies at all (approve also needs a step that wants it).
COMMAND_STATES: Final[Mapping[str, frozenset[str]]] = {
    APPROVE: ACTIVE,
    PAUSE: frozenset({PROGRESSING, WAITING}),
    RESUME: frozenset({PAUSED}),
    ABORT: ACTIVE,
}

# Stages of the current step (Release.stage): what it does or waits for.
PRE_RELEASE: Final = "pre-release"  # the release's first stage, if it has such webhooks
APPROVAL: Final = "approval"  # the promotion step's approval, before its gates and switch
CONFIRM_STEP: Final = "confirm-step"
CONFIRM_PROMOTION: Final = "confirm-promotion"
RUNNING: Final = "running"  # the step's weight is set
DONE: Final = "done"  # the release is over

# Webhook phases: asked and answered (the release waits), or notices (sent, never awaited).
ROLLBACK_NOTICE: Final = "rollback"
POST_RELEASE: Final = "post-release"
EVENT: Final = "event"
ASKED_PHASES: Final = (PRE_RELEASE, CONFIRM_STEP, CONFIRM_PROMOTION)
NOTICE_PHASES: Final = (ROLLBACK_NOTICE, POST_RELEASE, EVENT)
PHASES: Final = ASKED_PHASES + NOTICE_PHASES

# Check results.
PASSED: Final = "passed"
FAILED: Final = "failed"
INCONCLUSIVE: Final = "inconclusive"

MAX_CHECKS: Final = 20  # kept per release, newest last
# A refused gate is asked again every analysis interval; without analysis, this often.
GATE_RETRY_WITHOUT_ANALYSIS: Final = 10.0
DEFAULT_WEBHOOK_TIMEOUT: Final = 5.0
DEFAULT_NOTICE_RETRIES: Final = 2  # a notice is sent at most 3 times; an asked phase once
MAX_RETRIES: Final = 10

# ---------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True)
class Step:
    weight: float  # the canary's share, percent
    pause: float = 0.0  # seconds the step lasts at least
    approval: bool = False


@dataclass(frozen=True, slots=True)
class ErrorRateCheck:
    max_increase: float  # canary error rate - baseline error rate, absolute


@dataclass(frozen=True, slots=True)
class LatencyCheck:
    max_ratio: float  # canary p99 <= max(max_ratio * baseline p99, min_ms)
    min_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float = 10.0
    min_requests: int = 50  # per version and check
    max_inconclusive: int = 6  # in a row -> paused
    failure_limit: int = 2  # failed checks in one release -> rolled back
    error_rate: ErrorRateCheck | None = None
    latency_p99: LatencyCheck | None = None


@dataclass(frozen=True, slots=True)
class Webhook:
    phase: str
    url: str
    timeout: float = DEFAULT_WEBHOOK_TIMEOUT
    retries: int = 0  # further attempts after a failed one


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    canary: str
    baseline: str  # the service's baseline when the spec was validated
    steps: tuple[Step, ...]
    analysis: Analysis | None = None
    webhooks: tuple[Webhook, ...] = ()

    def hooks(self, phase: str) -> tuple[Webhook, ...]:
        return tuple(hook for hook in self.webhooks if hook.phase == phase)

    def weights(self, canary: float) -> dict[str, float]:
        """The split with the canary at ``canary`` percent: the baseline has the rest (any
        other version of the service 0, as every weight left out of a change)."""
        return {self.baseline: round(100.0 - canary, 2), self.canary: canary}


# ---------------------------------------------------------------------------- validation


class InvalidRelease(ConfigError):
    """A refused release spec: ``problems`` are (path, message) pairs, ``errors`` their text."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__([f"{path}: {message}" if path else message for path, message in problems])
        self.problems = problems


_SPEC_KEYS: Final = ("canary", "steps", "analysis", "webhooks")
_STEP_KEYS: Final = ("weight", "pause", "approval")
_ANALYSIS_KEYS: Final = (
    "interval",
    "min_requests",
    "max_inconclusive",
    "failure_limit",
    "error_rate",
    "latency_p99",
)
_ERROR_RATE_KEYS: Final = ("max_increase",)
_LATENCY_KEYS: Final = ("max_ratio", "min_ms")
_WEBHOOK_KEYS: Final = ("phase", "url", "timeout", "retries")


def parse_release(raw: object, versions: Sequence[str] | None, baseline: str) -> ReleaseSpec:
    """A release spec from plain data (decoded JSON, or YAML made plain by the loader);
    InvalidRelease with every problem and its path. Durations are "250ms", "5s", "2m" or a
    number of seconds. ``versions`` are the service's (None: not known, not checked)."""
    reader = _SpecReader()
    spec = reader.spec(raw, versions, baseline)
    if reader.problems or spec is None:
        raise InvalidRelease(reader.problems)
    return spec


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


class _SpecReader:
    """Walks the plain data, collecting every problem; readers return None for a bad value."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def mapping(self, raw: object, path: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The keys given (a null value counts as absent); unknown keys are problems."""
        if not isinstance(raw, Mapping):
            self.problem(path, f"expected a mapping, got {_kind(raw)}")
            return None
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in allowed:
                self.problem(_join(path, str(key)), f"unknown key (expected: {', '.join(allowed)})")
            elif value is not None:
                values[key] = value
        return values

    def items(self, raw: object, path: str) -> list[tuple[Any, str]] | None:
        if not isinstance(raw, list | tuple):
            self.problem(path, f"expected a list, got {_kind(raw)}")
            return None
        return [(item, f"{path}[{index}]") for index, item in enumerate(raw)]

    def number(self, raw: object, path: str, *, positive: bool = False) -> float | None:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            self.problem(path, f"expected a number, got {_kind(raw)}")
            return None
        if isinstance(raw, float) and not math.isfinite(raw):
            self.problem(path, "must be a finite number")
            return None
        if raw < 0:
            self.problem(path, "must not be negative")
            return None
        if positive and raw == 0:
            self.problem(path, "must be greater than zero")
            return None
        return float(raw)

    def integer(
        self, raw: object, path: str, minimum: int, maximum: int | None = None
    ) -> int | None:
        if isinstance(raw, bool) or not isinstance(raw, int):
            self.problem(path, f"expected an integer, got {_kind(raw)}")
            return None
        if raw < minimum:
            self.problem(path, f"must be at least {minimum}")
            return None
        if maximum is not None and raw > maximum:
            self.problem(path, f"must be at most {maximum}")
            return None
        return raw

    def boolean(self, raw: object, path: str) -> bool | None:
        if not isinstance(raw, bool):
            self.problem(path, f"expected true or false, got {_kind(raw)}")
            return None
        return raw

    def text(self, raw: object, path: str) -> str | None:
        if not isinstance(raw, str):
            self.problem(path, f"expected a string, got {_kind(raw)}")
            return None
        return raw

    def duration(self, raw: object, path: str, *, positive: bool) -> float | None:
        if isinstance(raw, str):
            # The config's own duration syntax (imported here: the loader imports this module).
            from proxy.loader import parse_duration

            try:
                seconds = parse_duration(raw)
            except ValueError as exc:
                self.problem(path, str(exc))
                return None
            if positive and seconds == 0:
                self.problem(path, "must be greater than zero")
                return None
            return seconds
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            self.problem(path, f'expected a duration such as "5s", got {_kind(raw)}')
            return None
        return self.number(raw, path, positive=positive)

    # ------------------------------------------------------------------ sections

    def spec(
        self, raw: object, versions: Sequence[str] | None, baseline: str
    ) -> ReleaseSpec | None:
        fields = self.mapping(raw, "", _SPEC_KEYS)
        if fields is None:
            return None
        canary = self.canary(fields.get("canary"), versions, baseline)
        steps = self.steps(fields.get("steps"))
        analysis = self.analysis(fields["analysis"]) if "analysis" in fields else None
        webhooks = self.webhooks(fields.get("webhooks", []))
        if canary is None or steps is None:
            return None
        return ReleaseSpec(canary, baseline, steps, analysis, webhooks)

    def canary(self, raw: object, versions: Sequence[str] | None, baseline: str) -> str | None:
        if raw is None:
            self.problem("canary", "required: the version to release")
            return None
        name = self.text(raw, "canary")
        if name is None:
            return None
        if versions is not None and name not in versions:
            self.problem("canary", unknown_version(name, list(versions)))
            return None
        if name == baseline:
            self.problem("canary", f"{name!r} is the service's baseline; release another version")
            return None
        return name

    def steps(self, raw: object) -> tuple[Step, ...] | None:
        if raw is None:
            self.problem("steps", "required: the canary's weight at each step, e.g. [{weight: 10}]")
            return None
        items = self.items(raw, "steps")
        if items is None:
            return None
        if not items:
            self.problem("steps", "at least one step is required")
            return None
        steps: list[Step | None] = [self.step(item, path) for item, path in items]
        previous: float | None = None
        for (_, path), step in zip(items, steps, strict=True):
            if step is None:
                previous = None  # unknown: the next step is not compared
                continue
            if previous is not None and step.weight <= previous:
                self.problem(
                    f"{path}.weight",
                    f"must be above the previous step's ({previous:g}): steps only rise",
                )
            previous = step.weight
        last, last_path = steps[-1], items[-1][1]
        if last is not None and last.weight != 100:
            self.problem(
                f"{last_path}.weight",
                "the last step must be at 100 (reaching it promotes the canary)",
            )
        if last is not None and last.weight == 100 and last.pause:
            self.problem(
                f"{last_path}.pause",
                "the step at 100 promotes the canary when it is reached: it has no pause",
            )
        if any(step is None for step in steps):
            return None
        return tuple(step for step in steps if step is not None)

    def step(self, raw: object, path: str) -> Step | None:
        fields = self.mapping(raw, path, _STEP_KEYS)
        if fields is None:
            return None
        weight = self.weight(fields.get("weight"), f"{path}.weight")
        pause = self.duration(fields.get("pause", 0), f"{path}.pause", positive=False)
        approval = self.boolean(fields.get("approval", False), f"{path}.approval")
        if weight is None or pause is None or approval is None:
            return None
        return Step(weight, pause, approval)

    def weight(self, raw: object, path: str) -> float | None:
        if raw is None:
            self.problem(path, "required: the canary's weight in percent, 0 to 100")
            return None
        weight = self.number(raw, path)
        if weight is None:
            return None
        if weight > 100:
            self.problem(path, "must be at most 100 (percent)")
            return None
        if problem := weight_problem(weight):
            self.problem(path, problem)
            return None
        return weight

    def analysis(self, raw: object) -> Analysis | None:
        path = "analysis"
        fields = self.mapping(raw, path, _ANALYSIS_KEYS)
        if fields is None:
            return None
        default = Analysis()
        interval = self.duration(
            fields.get("interval", default.interval), f"{path}.interval", positive=True
        )
        min_requests = self.integer(
            fields.get("min_requests", default.min_requests), f"{path}.min_requests", 1
        )
        max_inconclusive = self.integer(
            fields.get("max_inconclusive", default.max_inconclusive), f"{path}.max_inconclusive", 1
        )
        failure_limit = self.integer(
            fields.get("failure_limit", default.failure_limit), f"{path}.failure_limit", 1
        )
        error_rate = self.error_rate(fields.get("error_rate"), f"{path}.error_rate")
        latency = self.latency(fields.get("latency_p99"), f"{path}.latency_p99")
        if "error_rate" not in fields and "latency_p99" not in fields:
            self.problem(path, "needs error_rate or latency_p99 (or no analysis at all)")
            return None
        if None in (interval, min_requests, max_inconclusive, failure_limit):
            return None
        if ("error_rate" in fields and error_rate is None) or (
            "latency_p99" in fields and latency is None
        ):
            return None
        assert interval is not None and min_requests is not None
        assert max_inconclusive is not None and failure_limit is not None
        return Analysis(
            interval, min_requests, max_inconclusive, failure_limit, error_rate, latency
        )

    def error_rate(self, raw: object, path: str) -> ErrorRateCheck | None:
        if raw is None:
            return None
        fields = self.mapping(raw, path, _ERROR_RATE_KEYS)
        if fields is None:
            return None
        if "max_increase" not in fields:
            self.problem(f"{path}.max_increase", "required, e.g. 0.01 (one point of error rate)")
            return None
        increase = self.number(fields["max_increase"], f"{path}.max_increase")
        if increase is not None and increase > 1:
            self.problem(f"{path}.max_increase", "must be at most 1 (a rate, not a percentage)")
            return None
        return None if increase is None else ErrorRateCheck(increase)

    def latency(self, raw: object, path: str) -> LatencyCheck | None:
        if raw is None:
            return None
        fields = self.mapping(raw, path, _LATENCY_KEYS)
        if fields is None:
            return None
        if "max_ratio" not in fields:
            self.problem(f"{path}.max_ratio", "required, e.g. 1.5 (canary p99 <= 1.5 x baseline)")
            return None
        ratio = self.number(fields["max_ratio"], f"{path}.max_ratio", positive=True)
        min_ms = self.number(fields.get("min_ms", 0), f"{path}.min_ms")
        if ratio is None or min_ms is None:
            return None
        return LatencyCheck(ratio, min_ms)

    def webhooks(self, raw: object) -> tuple[Webhook, ...]:
        items = self.items(raw, "webhooks") or []
        hooks = (self.webhook(item, path) for item, path in items)
        return tuple(hook for hook in hooks if hook is not None)

    def webhook(self, raw: object, path: str) -> Webhook | None:
        fields = self.mapping(raw, path, _WEBHOOK_KEYS)
        if fields is None:
            return None
        phase = self.phase(fields.get("phase"), f"{path}.phase")
        url = self.url(fields.get("url"), f"{path}.url")
        timeout = self.duration(
            fields.get("timeout", DEFAULT_WEBHOOK_TIMEOUT), f"{path}.timeout", positive=True
        )
        default_retries = DEFAULT_NOTICE_RETRIES if phase in NOTICE_PHASES else 0
        retries = self.integer(
            fields.get("retries", default_retries), f"{path}.retries", 0, MAX_RETRIES
        )
        if phase is None or url is None or timeout is None or retries is None:
            return None
        return Webhook(phase, url, timeout, retries)

    def phase(self, raw: object, path: str) -> str | None:
        if raw is None:
            self.problem(path, f"required: one of {', '.join(PHASES)}")
            return None
        phase = self.text(raw, path)
        if phase is not None and phase not in PHASES:
            self.problem(path, f"unknown phase {phase!r} (phases: {', '.join(PHASES)})")
            return None
        return phase

    def url(self, raw: object, path: str) -> str | None:
        if raw is None:
            self.problem(path, "required: the http:// or https:// URL to POST to")
            return None
        url = self.text(raw, path)
        if url is None:
            return None
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            self.problem(path, f"{url!r}: not a valid URL ({exc})")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(path, f"{url!r}: expected an http:// or https:// URL with a host")
            return None
        return url


def spec_json(spec: ReleaseSpec) -> dict[str, Any]:
    """The spec as plain data that parse_release reads back to an equal spec (durations in
    seconds): what the API shows and a restart restores from."""
    raw: dict[str, Any] = {
        "canary": spec.canary,
        "steps": [
            {"weight": _number(step.weight), "pause": step.pause, "approval": step.approval}
            for step in spec.steps
        ],
        "webhooks": [
            {"phase": h.phase, "url": h.url, "timeout": h.timeout, "retries": h.retries}
            for h in spec.webhooks
        ],
    }
    analysis = spec.analysis
    if analysis is not None:
        section: dict[str, Any] = {
            "interval": analysis.interval,
            "min_requests": analysis.min_requests,
            "max_inconclusive": analysis.max_inconclusive,
            "failure_limit": analysis.failure_limit,
        }
        if analysis.error_rate is not None:
            section["error_rate"] = {"max_increase": analysis.error_rate.max_increase}
        if analysis.latency_p99 is not None:
            latency = analysis.latency_p99
            section["latency_p99"] = {"max_ratio": latency.max_ratio, "min_ms": latency.min_ms}
        raw["analysis"] = section
    return raw


# ---------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class Reading:
    """One version's requests that finished in one interval."""

    requests: int
    errors: int  # 5xx, upstream failures included (the client got 502/504)
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Check:
    at: float
    result: str  # PASSED | FAILED | INCONCLUSIVE
    baseline: Reading
    canary: Reading
    reason: str


def judge(baseline: Reading, canary: Reading, analysis: Analysis, at: float) -> Check:
    """Compare the canary with the baseline over the same interval.

    Fewer than ``min_requests`` on either side: inconclusive. Failed when the canary's
    error rate exceeds the baseline's by more than ``max_increase``, or its p99 exceeds
    ``max(max_ratio x baseline p99, min_ms)``. The reason names each metric and both values.
    """
    minimum = analysis.min_requests
    if baseline.requests < minimum or canary.requests < minimum:
        reason = (
            f"not enough traffic: canary {canary.requests} requests, baseline "
            f"{baseline.requests} (min_requests {minimum})"
        )
        return Check(at, INCONCLUSIVE, baseline, canary, reason)
    failed: list[str] = []
    passed: list[str] = []
    if analysis.error_rate is not None:
        ok, text = _error_rate_verdict(baseline, canary, analysis.error_rate)
        (passed if ok else failed).append(text)
    if analysis.latency_p99 is not None:
        ok, text = _latency_verdict(baseline, canary, analysis.latency_p99)
        (passed if ok else failed).append(text)
    if failed:
        return Check(at, FAILED, baseline, canary, "; ".join(failed))
    return Check(at, PASSED, baseline, canary, "; ".join(passed))


def _error_rate_verdict(
    baseline: Reading, canary: Reading, limit: ErrorRateCheck
) -> tuple[bool, str]:
    canary_rate = Fraction(canary.errors, canary.requests)
    baseline_rate = Fraction(baseline.errors, baseline.requests)
    ok = canary_rate <= baseline_rate + _exact(limit.max_increase)
    sign = "<=" if ok else ">"
    return ok, (
        f"error_rate: canary {_rate(canary_rate)} {sign} baseline {_rate(baseline_rate)}"
        f" + {_rate(Fraction(_exact(limit.max_increase)))}"
    )


def _latency_verdict(baseline: Reading, canary: Reading, limit: LatencyCheck) -> tuple[bool, str]:
    bound = max(_exact(limit.max_ratio) * _exact(baseline.p99_ms), _exact(limit.min_ms))
    ok = _exact(canary.p99_ms) <= bound
    sign = "<=" if ok else ">"
    return ok, (
        f"latency_p99: canary {canary.p99_ms:g}ms {sign} max({limit.max_ratio:g} x baseline "
        f"{baseline.p99_ms:g}ms, {limit.min_ms:g}ms) = {float(bound):g}ms"
    )


def _exact(value: float) -> Fraction:
    """The decimal the number was written as: 0.1 is 1/10, not the float nearest to it."""
    return Fraction(repr(float(value)))


def _rate(rate: Fraction) -> str:
    """0.25, 0.00, 0.125, 0.3333: two decimals, up to four where they are needed."""
    for digits in (2, 3):
        if Fraction(round(rate, digits)) == rate:
            return f"{float(rate):.{digits}f}"
    return f"{float(rate):.4f}"


# ---------------------------------------------------------------------------- events, actions


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: pauses end, refused gates are asked again."""

    kind: str = field(default=TICK, init=False)


@dataclass(frozen=True, slots=True)
class Measured:
    """Both versions' requests finished between ``since`` and now."""

    since: float
    baseline: Reading
    canary: Reading
    kind: str = field(default=MEASURED, init=False)


@dataclass(frozen=True, slots=True)
class Answered:
    """The webhooks of an asked phase answered: all 2xx (``ok``) or not, and how."""

    phase: str
    ok: bool
    detail: str = ""
    kind: str = field(default=ANSWERED, init=False)


@dataclass(frozen=True, slots=True)
class Approve:
    actor: str = "admin"
    kind: str = field(default=APPROVE, init=False)


@dataclass(frozen=True, slots=True)
class Pause:
    actor: str = "admin"
    kind: str = field(default=PAUSE, init=False)


@dataclass(frozen=True, slots=True)
class Resume:
    actor: str = "admin"
    kind: str = field(default=RESUME, init=False)


@dataclass(frozen=True, slots=True)
class Abort:
    """``restore``: the baseline gets all traffic back; without, the weights stay as they
    are (a forced weight change replaces them at once)."""

    actor: str = "admin"
    restore: bool = True
    why: str = ""
    kind: str = field(default=ABORT, init=False)


Event = Tick | Measured | Answered | Approve | Pause | Resume | Abort


@dataclass(frozen=True, slots=True)
class SetWeights:
    weights: Mapping[str, float]  # baseline and canary; every other version gets 0


@dataclass(frozen=True, slots=True)
class Ask:
    """Call the phase's webhooks in order (stop at the first refusal), then feed back one
    ``Answered(phase, ok, detail)``."""

    phase: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Send the phase's webhooks a notice (bounded retries; nothing waits for it)."""

    phase: str


Action = SetWeights | Ask | Notify


class Refused(Exception):
    """A command that does not apply to the release as it is (the API's 409)."""


class IllegalTransition(RuntimeError):
    """The engine tried a move TRANSITIONS does not allow: a bug, never bad input."""


# ---------------------------------------------------------------------------- the release


@dataclass(frozen=True, slots=True)
class Release:
    service: str
    canary: str
    baseline: str
    state: str
    stage: str
    step: int  # index into spec.steps
    weight: float  # the canary's share as this release last set it (at start: as it was)
    reason: str
    started_at: float
    updated_at: float  # the last change of state
    step_started_at: float = 0.0  # when the current step's weight was set
    applied: bool = False  # the release has set a weight: checks count from then
    approved: bool = False  # the current step's approval
    passed: bool = False  # the latest check passed and covered only the current step
    asking: bool = False  # the stage's webhooks are asked; their answer is awaited
    ask_at: float = 0.0  # when the stage's webhooks are asked (again)
    failures: int = 0
    inconclusive: int = 0  # in a row, while progressing
    checks: tuple[Check, ...] = ()

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def __repr__(self) -> str:
        return (
            f"<Release {self.service} [{self.state} | step {self.step} {self.stage} | "
            f"canary {self.canary} {self.weight:g}% | failures {self.failures}]>"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    release: Release
    actions: tuple[Action, ...] = ()


def start(service: str, spec: ReleaseSpec, now: float, weight: float = 0.0) -> Outcome:
    """A new release of ``service`` (whose canary has ``weight`` percent now)."""
    release = Release(
        service=service,
        canary=spec.canary,
        baseline=spec.baseline,
        state=PROGRESSING,
        stage=PRE_RELEASE,
        step=0,
        weight=weight,
        reason="starting",
        started_at=now,
        updated_at=now,
        ask_at=now,
    )
    if spec.hooks(PRE_RELEASE):
        release, actions = _proceed(release, spec, now)
    else:
        release, actions = _enter_step(release, spec, 0, now)
    if release.state not in STARTS:
        raise IllegalTransition(f"start -> {release.state} ({release.reason})")
    notices = _notices(None, release, spec)
    return Outcome(release, (*actions, *notices))


def advance(release: Release, spec: ReleaseSpec, now: float, event: Event) -> Outcome:
    """The release after ``event`` at ``now``, and what to do about it.

    A command (approve, pause, resume, abort) that does not apply raises Refused; any
    other event that does not apply (a stale answer, a tick of a finished release)
    changes nothing.
    """
    if event.kind in COMMANDS and release.state not in COMMAND_STATES[event.kind]:
        raise Refused(_not_now(release, event.kind))
    if release.state in FINAL:
        return Outcome(release)
    after, actions = _HANDLERS[event.kind](release, spec, now, event)
    allowed = TRANSITIONS[release.state].get(event.kind, frozenset())
    if after.state not in allowed:
        raise IllegalTransition(f"{release.state} -{event.kind}-> {after.state} ({after.reason})")
    return Outcome(after, (*actions, *_notices(release, after, spec)))


def _not_now(release: Release, command: str) -> str:
    if release.state in FINAL:
        return f"the release of {release.canary} is over ({release.state}): nothing to {command}"
    return f"the release of {release.canary} is {release.state}: cannot {command} it now"


Handler = Callable[[Release, ReleaseSpec, float, Any], tuple[Release, list[Action]]]


def _on_tick(
    r: Release, spec: ReleaseSpec, now: float, event: Tick
) -> tuple[Release, list[Action]]:
    if r.state == PAUSED:
        return r, []
    return _proceed(r, spec, now)


def _on_measured(
    r: Release, spec: ReleaseSpec, now: float, event: Measured
) -> tuple[Release, list[Action]]:
    analysis = spec.analysis
    if analysis is None or not r.applied:
        return r, []  # checks start with the release's first weight
    check = judge(event.baseline, event.canary, analysis, now)
    r = replace(r, checks=(*r.checks, check)[-MAX_CHECKS:], passed=False)
    if check.result == FAILED:
        r = replace(r, failures=r.failures + 1, inconclusive=0)
        if r.failures >= analysis.failure_limit:
            return _roll_back(r, spec, now, check, analysis.failure_limit)
    elif check.result == PASSED:
        r = replace(r, inconclusive=0, passed=event.since >= r.step_started_at)
    elif r.state == PROGRESSING:
        r = replace(r, inconclusive=r.inconclusive + 1)
        if r.inconclusive >= analysis.max_inconclusive:
            reason = (
                f"paused: not enough traffic ({r.inconclusive} inconclusive checks in a row; "
                f"last: {check.reason}); resume to go on"
            )
            return _to(r, PAUSED, now, reason, asking=False, ask_at=now), []
    if r.state == PAUSED:
        return r, []
    return _proceed(r, spec, now)


def _on_answered(
    r: Release, spec: ReleaseSpec, now: float, event: Answered
) -> tuple[Release, list[Action]]:
    if r.state == PAUSED or not r.asking or r.stage != event.phase:
        return r, []  # stale: asked before a pause, or for a stage that is over
    r = replace(r, asking=False)
    if event.ok:
        return _next_stage(r, spec, now)
    if event.phase == PRE_RELEASE:
        reason = f"aborted: the pre-release webhooks refused ({event.detail}); nothing was changed"
        return _to(r, ABORTED, now, reason, stage=DONE), []
    retry = _gate_retry(spec)
    reason = (
        f"waiting for the {event.phase} webhooks of step {r.step + 1}: {event.detail}; "
        f"asked again every {_duration(retry)}"
    )
    r = _to(r, WAITING, now, reason, ask_at=now + retry)
    return _proceed(r, spec, now)


def _on_approve(
    r: Release, spec: ReleaseSpec, now: float, event: Approve
) -> tuple[Release, list[Action]]:
    step = spec.steps[r.step]
    where = _step_text(r, spec)
    if not step.approval:
        raise Refused(f"{where} needs no approval")
    if r.approved:
        raise Refused(f"{where} is already approved")
    r = replace(r, approved=True)
    if r.state == PAUSED:
        return replace(r, reason=f"{r.reason} ({where} approved by {event.actor})"), []
    return _proceed(_to(r, PROGRESSING, now, f"{where} approved by {event.actor}"), spec, now)


def _on_pause(
    r: Release, spec: ReleaseSpec, now: float, event: Pause
) -> tuple[Release, list[Action]]:
    reason = f"paused by {event.actor} at {_step_text(r, spec)}; resume to go on"
    return _to(r, PAUSED, now, reason, asking=False, ask_at=now), []


def _on_resume(
    r: Release, spec: ReleaseSpec, now: float, event: Resume
) -> tuple[Release, list[Action]]:
    r = _to(r, PROGRESSING, now, f"resumed by {event.actor}", inconclusive=0)
    return _proceed(r, spec, now)


def _on_abort(
    r: Release, spec: ReleaseSpec, now: float, event: Abort
) -> tuple[Release, list[Action]]:
    restore = event.restore and r.applied
    reason = f"aborted by {event.actor}"
    if event.why:
        reason += f": {event.why}"
    if restore:
        reason += f"; {r.baseline} has all traffic again"
        r = replace(r, weight=0.0)
    r = _to(r, ABORTED, now, reason, stage=DONE, asking=False)
    return r, [SetWeights(spec.weights(0.0))] if restore else []


_HANDLERS: Final[Mapping[str, Handler]] = {
    TICK: _on_tick,
    MEASURED: _on_measured,
    ANSWERED: _on_answered,
    APPROVE: _on_approve,
    PAUSE: _on_pause,
    RESUME: _on_resume,
    ABORT: _on_abort,
}


def step_stages(spec: ReleaseSpec, index: int) -> tuple[str, ...]:
    """What step ``index`` goes through, in order, ending with RUNNING (its weight set)."""
    step = spec.steps[index]
    promotion = index == len(spec.steps) - 1
    stages = [APPROVAL] if promotion and step.approval else []
    gates = (CONFIRM_STEP, CONFIRM_PROMOTION) if promotion else (CONFIRM_STEP,)
    stages += [phase for phase in gates if spec.hooks(phase)]
    return (*stages, RUNNING)


def _proceed(r: Release, spec: ReleaseSpec, now: float) -> tuple[Release, list[Action]]:
    """Go as far as the release can now (a progressing or waiting one), step after step."""
    actions: list[Action] = []
    while r.state in (PROGRESSING, WAITING):
        if r.stage in ASKED_PHASES:
            if not r.asking and now >= r.ask_at:
                actions.append(Ask(r.stage))
                r = replace(r, asking=True)
                if r.state == PROGRESSING:
                    r = replace(r, reason=f"asking the {r.stage} webhooks ({_step_text(r, spec)})")
            return r, actions
        if r.stage == APPROVAL:
            if not r.approved:
                return _to(r, WAITING, now, _approval_text(r, spec)), actions
            r, more = _next_stage(r, spec, now)
        elif r.stage == RUNNING:
            step = spec.steps[r.step]
            where = _step_text(r, spec)
            if now < r.step_started_at + step.pause:
                text = f"{where}: pausing {_duration(step.pause)}"
                return _to(r, PROGRESSING, now, text), actions
            if step.approval and not r.approved:
                return _to(r, WAITING, now, _approval_text(r, spec)), actions
            if spec.analysis is not None and not r.passed:
                text = f"{where}: waiting for a passing check"
                return _to(r, PROGRESSING, now, text), actions
            r, more = _enter_step(r, spec, r.step + 1, now)
        else:
            return r, actions
        actions += more
    return r, actions


def _enter_step(
    r: Release, spec: ReleaseSpec, index: int, now: float
) -> tuple[Release, list[Action]]:
    first = step_stages(spec, index)[0]
    r = replace(r, step=index, approved=False, passed=False)
    return _begin(r, spec, first, now)


def _next_stage(r: Release, spec: ReleaseSpec, now: float) -> tuple[Release, list[Action]]:
    """The current stage is done: on to the next of the step (or the first step)."""
    if r.stage == PRE_RELEASE:
        return _enter_step(r, spec, 0, now)
    stages = step_stages(spec, r.step)
    return _begin(r, spec, stages[stages.index(r.stage) + 1], now)


def _begin(r: Release, spec: ReleaseSpec, stage: str, now: float) -> tuple[Release, list[Action]]:
    r = _to(r, PROGRESSING, now, _step_text(r, spec), stage=stage, asking=False, ask_at=now)
    if stage != RUNNING:
        return _proceed(r, spec, now)
    weight = spec.steps[r.step].weight
    r = replace(r, weight=weight, applied=True, step_started_at=now, passed=False)
    actions: list[Action] = [SetWeights(spec.weights(weight))]
    if r.step == len(spec.steps) - 1:
        reason = f"promoted: {r.canary} has all traffic ({len(spec.steps)} steps)"
        return _to(r, PROMOTED, now, reason, stage=DONE), actions
    r, more = _proceed(r, spec, now)
    return r, actions + more


def _roll_back(
    r: Release, spec: ReleaseSpec, now: float, check: Check, limit: int
) -> tuple[Release, list[Action]]:
    reason = (
        f"rolled back at {_step_text(r, spec)}: {check.reason} "
        f"({r.failures} failed checks, failure_limit {limit})"
    )
    r = replace(r, weight=0.0, asking=False)
    return _to(r, ROLLED_BACK, now, reason, stage=DONE), [SetWeights(spec.weights(0.0))]


def _to(r: Release, state: str, now: float, reason: str, **changes: Any) -> Release:
    if state != r.state:
        changes["updated_at"] = now
    return replace(r, state=state, reason=reason, **changes)


def _notices(before: Release | None, after: Release, spec: ReleaseSpec) -> list[Action]:
    """The notices a change sends: an event on every change of state, step or weight;
    rollback when the baseline got its traffic back; post-release when it is over."""
    phases = []
    if before is None or (before.state, before.step, before.weight) != (
        after.state,
        after.step,
        after.weight,
    ):
        phases.append(EVENT)
    if before is not None and before.state != after.state and after.state in FINAL:
        if after.state != PROMOTED and before.applied and after.weight == 0:
            phases.append(ROLLBACK_NOTICE)
        phases.append(POST_RELEASE)
    return [Notify(phase) for phase in phases if spec.hooks(phase)]


def _gate_retry(spec: ReleaseSpec) -> float:
    return spec.analysis.interval if spec.analysis is not None else GATE_RETRY_WITHOUT_ANALYSIS


def _step_text(r: Release, spec: ReleaseSpec) -> str:
    step = spec.steps[r.step]
    return f"step {r.step + 1} of {len(spec.steps)} (canary {step.weight:g}%)"


def _approval_text(r: Release, spec: ReleaseSpec) -> str:
    return f"waiting for approval of {_step_text(r, spec)}: POST .../release/approve"


def _duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# ---------------------------------------------------------------------------- JSON


def iso_time(timestamp: float) -> str:
    """A wall-clock timestamp as ISO 8601 UTC with milliseconds."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reading_json(reading: Reading) -> dict[str, Any]:
    return {
        "requests": reading.requests,
        "errors": reading.errors,
        "error_rate": round(reading.error_rate, 4),
        "p99_ms": reading.p99_ms,
    }


def check_json(check: Check) -> dict[str, Any]:
    return {
        "at": iso_time(check.at),
        "result": check.result,
        "baseline": reading_json(check.baseline),
        "canary": reading_json(check.canary),
        "reason": check.reason,
    }


def release_json(release: Release, spec: ReleaseSpec) -> dict[str, Any]:
    """What GET .../release answers (docs/releases.md)."""
    step = spec.steps[release.step]
    return {
        "service": release.service,
        "state": release.state,
        "step": release.step,
        "steps": len(spec.steps),
        "weight": _number(release.weight),
        "canary": release.canary,
        "baseline": release.baseline,
        "reason": release.reason,
        "failures": release.failures,
        "inconclusive": release.inconclusive,
        "approval": None if not step.approval else "approved" if release.approved else "pending",
        "started_at": iso_time(release.started_at),
        "updated_at": iso_time(release.updated_at),
        "checks": [check_json(check) for check in release.checks],
        "spec": spec_json(spec),
    }


def release_state(release: Release) -> dict[str, Any]:
    """Every field as plain data (timestamps as numbers), for release_from_state."""
    fields = {name: getattr(release, name) for name in Release.__dataclass_fields__}
    fields["checks"] = [
        {
            "at": check.at,
            "result": check.result,
            "baseline": [check.baseline.requests, check.baseline.errors, check.baseline.p99_ms],
            "canary": [check.canary.requests, check.canary.errors, check.canary.p99_ms],
            "reason": check.reason,
        }
        for check in release.checks
    ]
    return fields


def release_from_state(data: Mapping[str, Any]) -> Release:
    """The Release that release_state wrote; ValueError (or KeyError, TypeError) if not one."""
    fields = dict(data)
    checks = tuple(
        Check(
            float(item["at"]),
            str(item["result"]),
            Reading(*item["baseline"]),
            Reading(*item["canary"]),
            str(item["reason"]),
        )
        for item in fields.pop("checks")
    )
    release = Release(**fields, checks=checks)
    if release.state not in STATES or release.stage not in (*ASKED_PHASES, APPROVAL, RUNNING, DONE):
        raise ValueError(f"not a release state: {release.state!r}, stage {release.stage!r}")
    return release
