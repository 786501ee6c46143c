"""The pure release engine: the spec's validation, the checks, the state machine (as data, by
scenario and by property)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event as event_note
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, weight_problem
from proxy.loader import load_config, parse_config
from proxy.release import (
    ABORTED,
    ACTIVE,
    APPROVAL,
    ASKED_PHASES,
    COMMAND_STATES,
    COMMANDS,
    CONFIRM_PROMOTION,
    CONFIRM_STEP,
    FAILED,
    FINAL,
    INCONCLUSIVE,
    PASSED,
    PAUSED,
    PRE_RELEASE,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    STARTS,
    STATES,
    TRANSITIONS,
    WAITING,
    Abort,
    Action,
    Analysis,
    Answered,
    Approve,
    Ask,
    ErrorRateCheck,
    Event,
    InvalidRelease,
    LatencyCheck,
    Measured,
    Notify,
    Outcome,
    Pause,
    Reading,
    Refused,
    Release,
    ReleaseSpec,
    Resume,
    SetWeights,
    Step,
    Tick,
    Webhook,
    advance,
    judge,
    parse_release,
    release_from_state,
    release_json,
    release_state,
    spec_json,
    start,
    step_stages,
)

VERSIONS = ["stable", "canary", "other"]
GOOD = Reading(100, 0, 5.0)
FEW = Reading(3, 0, 5.0)
BROKEN = Reading(100, 25, 5.0)


def spec_of(**raw: Any) -> ReleaseSpec:
    raw.setdefault("canary", "canary")
    raw.setdefault("steps", [{"weight": 10}, {"weight": 100}])
    return parse_release(raw, VERSIONS, "stable")


def problems(raw: object, versions: Sequence[str] | None = VERSIONS) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRelease) as caught:
        parse_release(raw, versions, "stable")
    return caught.value.problems


def paths(raw: object) -> list[str]:
    return [path for path, _ in problems(raw)]


DELETE = object()  # a key left out
ANALYSIS = {"interval": "1s", "min_requests": 50, "error_rate": {"max_increase": 0.01}}


# ---------------------------------------------------------------------------- validation


def test_a_full_spec_reads_durations_as_written_in_yaml_or_as_seconds_in_json() -> None:
    from_yaml = spec_of(
        steps=[
            {"weight": 5, "pause": "1m"},
            {"weight": 25.5, "pause": "250ms"},
            {"weight": 50, "approval": True},
            {"weight": 100},
        ],
        analysis={
            "interval": "10s",
            "min_requests": 50,
            "max_inconclusive": 6,
            "failure_limit": 2,
            "error_rate": {"max_increase": 0.01},
            "latency_p99": {"max_ratio": 1.5, "min_ms": 5},
        },
        webhooks=[{"phase": "confirm-step", "url": "http://127.0.0.1:9000/gate", "timeout": "5s"}],
    )
    assert from_yaml == ReleaseSpec(
        canary="canary",
        baseline="stable",
        steps=(Step(5, 60.0), Step(25.5, 0.25), Step(50, 0.0, True), Step(100)),
        analysis=Analysis(10.0, 50, 6, 2, ErrorRateCheck(0.01), LatencyCheck(1.5, 5.0)),
        webhooks=(Webhook("confirm-step", "http://127.0.0.1:9000/gate", 5.0, 0),),
    )
    from_json = spec_of(
        steps=[
            {"weight": 5, "pause": 60},
            {"weight": 25.5, "pause": 0.25},
            {"weight": 50, "approval": True},
            {"weight": 100},
        ],
        analysis={**spec_json(from_yaml)["analysis"], "interval": 10},
        webhooks=[{"phase": "confirm-step", "url": "http://127.0.0.1:9000/gate", "timeout": 5}],
    )
    assert from_json == from_yaml


def test_defaults_of_analysis_and_webhooks() -> None:
    spec = spec_of(
        analysis={"latency_p99": {"max_ratio": 2}},
        webhooks=[
            {"phase": "event", "url": "https://hooks.example/e"},
            {"phase": "confirm-promotion", "url": "http://h/p"},
        ],
    )
    assert spec.analysis == Analysis(10.0, 50, 6, 2, None, LatencyCheck(2.0, 0.0))
    assert spec.webhooks == (
        Webhook("event", "https://hooks.example/e", 5.0, 2),  # notices retry twice
        Webhook("confirm-promotion", "http://h/p", 5.0, 0),  # an asked phase once
    )


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ({"canary": DELETE}, "canary", "required"),
        ({"steps": DELETE}, "steps", "required"),
        ({"canary": "nope"}, "canary", "unknown version 'nope' (versions: stable, canary, other)"),
        ({"canary": "stable"}, "canary", "is the service's baseline"),
        ({"canary": 7}, "canary", "expected a string, got a number"),
        ({"steps": []}, "steps", "at least one step"),
        ({"steps": {"weight": 100}}, "steps", "expected a list, got a mapping"),
        ({"steps": [{"weight": 101}]}, "steps[0].weight", "must be at most 100"),
        ({"steps": [{"weight": -1}, {"weight": 100}]}, "steps[0].weight", "must not be negative"),
        ({"steps": [{"weight": 10.005}, {"weight": 100}]}, "steps[0].weight", "multiple of 0.01"),
        ({"steps": [{"weight": True}, {"weight": 100}]}, "steps[0].weight", "expected a number"),
        ({"steps": [{"pause": "1s"}, {"weight": 100}]}, "steps[0].weight", "required"),
        ({"steps": [{"weight": 30}, {"weight": 30}, {"weight": 100}]}, "steps[1].weight", "rise"),
        ({"steps": [{"weight": 30}, {"weight": 20}, {"weight": 100}]}, "steps[1].weight", "rise"),
        (
            {"steps": [{"weight": 10}, {"weight": 50}]},
            "steps[1].weight",
            "last step must be at 100",
        ),
        ({"steps": [{"weight": 100, "pause": "1m"}]}, "steps[0].pause", "has no pause"),
        ({"steps": [{"weight": 9, "pause": "soon"}, {"weight": 100}]}, "steps[0].pause", "invalid"),
        ({"steps": [{"weight": 9, "pause": -2}, {"weight": 100}]}, "steps[0].pause", "negative"),
        (
            {"steps": [{"weight": 9, "approval": "yes"}, {"weight": 100}]},
            "steps[0].approval",
            "true",
        ),
        ({"steps": [{"weight": 9, "wait": 1}, {"weight": 100}]}, "steps[0].wait", "unknown key"),
        ({"analysis": {**ANALYSIS, "interval": 0}}, "analysis.interval", "greater than zero"),
        ({"analysis": {**ANALYSIS, "interval": "0s"}}, "analysis.interval", "greater than zero"),
        ({"analysis": {**ANALYSIS, "interval": -1}}, "analysis.interval", "negative"),
        ({"analysis": {**ANALYSIS, "interval": "-1s"}}, "analysis.interval", "invalid duration"),
        ({"analysis": {**ANALYSIS, "min_requests": 0}}, "analysis.min_requests", "at least 1"),
        ({"analysis": {**ANALYSIS, "failure_limit": 1.5}}, "analysis.failure_limit", "integer"),
        ({"analysis": {**ANALYSIS, "max_inconclusive": 0}}, "analysis.max_inconclusive", "least 1"),
        ({"analysis": {"interval": "1s"}}, "analysis", "needs error_rate or latency_p99"),
        ({"analysis": {"error_rate": {}}}, "analysis.error_rate.max_increase", "required"),
        (
            {"analysis": {"error_rate": {"max_increase": 5}}},
            "analysis.error_rate.max_increase",
            "at most 1",
        ),
        (
            {"analysis": {"latency_p99": {"min_ms": 5}}},
            "analysis.latency_p99.max_ratio",
            "required",
        ),
        (
            {"analysis": {"latency_p99": {"max_ratio": 0}}},
            "analysis.latency_p99.max_ratio",
            "greater than zero",
        ),
        ({"analysis": {**ANALYSIS, "every": 1}}, "analysis.every", "unknown key"),
        (
            {"webhooks": [{"phase": "gate", "url": "http://h/"}]},
            "webhooks[0].phase",
            "unknown phase",
        ),
        ({"webhooks": [{"url": "http://h/"}]}, "webhooks[0].phase", "required"),
        ({"webhooks": [{"phase": "event", "url": "h:80/x"}]}, "webhooks[0].url", "http://"),
        ({"webhooks": [{"phase": "event", "url": "ftp://h/x"}]}, "webhooks[0].url", "http://"),
        ({"webhooks": [{"phase": "event", "url": "http:///x"}]}, "webhooks[0].url", "with a host"),
        ({"webhooks": [{"phase": "event", "url": "http://h:99999/"}]}, "webhooks[0].url", "valid"),
        ({"webhooks": [{"phase": "event"}]}, "webhooks[0].url", "required"),
        (
            {"webhooks": [{"phase": "event", "url": "http://h/", "timeout": 0}]},
            "webhooks[0].timeout",
            "greater than zero",
        ),
        (
            {"webhooks": [{"phase": "event", "url": "http://h/", "retries": 11}]},
            "webhooks[0].retries",
            "at most 10",
        ),
        ({"webhooks": {"phase": "event"}}, "webhooks", "expected a list"),
        ({"baseline": "other"}, "baseline", "unknown key"),
    ],
)
def test_each_problem_is_named_with_its_path(raw: dict[str, Any], path: str, message: str) -> None:
    raw = {"canary": "canary", "steps": [{"weight": 10}, {"weight": 100}], **raw}
    found = problems({key: value for key, value in raw.items() if value is not DELETE})
    assert any(p == path and message in m for p, m in found), found


def test_a_spec_must_be_a_mapping_and_the_errors_read_with_their_paths() -> None:
    assert problems([1, 2]) == [("", "expected a mapping, got a list")]
    with pytest.raises(InvalidRelease) as caught:
        parse_release({"canary": "nope", "steps": [{"weight": 120}]}, VERSIONS, "stable")
    assert caught.value.errors == [
        "canary: unknown version 'nope' (versions: stable, canary, other)",
        "steps[0].weight: must be at most 100 (percent)",
    ]


def test_without_known_versions_the_canary_is_not_checked() -> None:
    spec = parse_release({"canary": "anything", "steps": [{"weight": 100}]}, None, "stable")
    assert spec.canary == "anything"


# Faults that each make exactly one problem, at their own path, whatever else is wrong.
FAULTS: dict[str, list[object]] = {
    "canary": ["nope", "stable", 3, ["canary"]],
    "weight": [150, -5, "ten", None, 10.001],
    "pause": ["soon", -1, "5 s", [1]],
    "approval": ["yes", 1],
    "unknown": [1],
    "interval": [0, "0ms", -3, "fast", True],
    "min_requests": [0, 2.5, "many"],
    "failure_limit": [0, "two"],
    "max_increase": [-0.1, 2, "1%"],
    "url": ["example.com/hook", "ftp://example.com/", "http://", 42],
    "phase": ["later", 1],
    "timeout": [0, "-5s", "never"],
}


@st.composite
def bad_specs(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A valid spec with faults at distinct paths, and those paths."""
    count = draw(st.integers(1, 4))
    steps: list[dict[str, Any]] = [{"weight": 10 * (i + 1)} for i in range(count)]
    steps.append({"weight": 100})
    hooks: list[dict[str, Any]] = [
        {"phase": "confirm-step", "url": "http://127.0.0.1:1/gate"},
        {"phase": "event", "url": "https://example.com/e"},
    ]
    raw: dict[str, Any] = {
        "canary": "canary",
        "steps": steps,
        "analysis": {"interval": "1s", "error_rate": {"max_increase": 0.01}},
        "webhooks": hooks,
    }
    faulty: set[str] = set()
    for kind in draw(st.sets(st.sampled_from(sorted(FAULTS)), min_size=1)):
        value = draw(st.sampled_from(FAULTS[kind]))
        if kind == "canary":
            raw["canary"] = value
            faulty.add("canary")
        elif kind in ("weight", "pause", "approval", "unknown"):
            index = draw(st.integers(0, len(steps) - 2))  # the last step stays at 100
            key = "extra" if kind == "unknown" else kind
            steps[index][key] = value
            faulty.add(f"steps[{index}].{key}")
        elif kind == "max_increase":
            raw["analysis"]["error_rate"]["max_increase"] = value
            faulty.add("analysis.error_rate.max_increase")
        elif kind in ("interval", "min_requests", "failure_limit"):
            raw["analysis"][kind] = value
            faulty.add(f"analysis.{kind}")
        else:
            index = draw(st.integers(0, len(hooks) - 1))
            hooks[index][kind] = value
            faulty.add(f"webhooks[{index}].{kind}")
    return raw, faulty


@given(bad_specs())
def test_every_fault_of_a_bad_spec_is_listed_at_its_path_and_nothing_else(
    case: tuple[dict[str, Any], set[str]],
) -> None:
    raw, faulty = case
    assert set(paths(raw)) == faulty


@st.composite
def specs(draw: st.DrawFn) -> ReleaseSpec:
    hundredths = draw(st.sets(st.integers(0, 9999), max_size=4))
    steps: list[dict[str, Any]] = [
        {
            "weight": value / 100,
            "pause": draw(st.sampled_from([0, 0.5, 3, "1m"])),
            "approval": draw(st.booleans()),
        }
        for value in sorted(hundredths)
    ]
    steps.append({"weight": 100, "approval": draw(st.booleans())})
    raw: dict[str, Any] = {"canary": "canary", "steps": steps}
    if draw(st.booleans()):
        analysis: dict[str, Any] = {
            "interval": draw(st.sampled_from([0.2, 1, "10s"])),
            "min_requests": draw(st.integers(1, 60)),
            "max_inconclusive": draw(st.integers(1, 4)),
            "failure_limit": draw(st.sampled_from([1, 1, 2, 3])),
        }
        kinds = draw(st.sets(st.sampled_from(["error_rate", "latency_p99"]), min_size=1))
        if "error_rate" in kinds:
            analysis["error_rate"] = {"max_increase": draw(st.sampled_from([0, 0.01, 0.2]))}
        if "latency_p99" in kinds:
            analysis["latency_p99"] = {"max_ratio": 1.5, "min_ms": draw(st.sampled_from([0, 5]))}
        raw["analysis"] = analysis
    phases = draw(st.sets(st.sampled_from([*ASKED_PHASES, "rollback", "post-release", "event"])))
    raw["webhooks"] = [{"phase": phase, "url": f"http://127.0.0.1:9/{phase}"} for phase in phases]
    return parse_release(raw, VERSIONS, "stable")


@given(specs())
def test_a_spec_reads_back_from_its_json(spec: ReleaseSpec) -> None:
    assert parse_release(spec_json(spec), VERSIONS, "stable") == spec


# ---------------------------------------------------------------------------- checks


def analysis(**changes: Any) -> Analysis:
    values: dict[str, Any] = {
        "interval": 1.0,
        "min_requests": 50,
        "error_rate": ErrorRateCheck(0.01),
        "latency_p99": LatencyCheck(1.5, 5.0),
    }
    values.update(changes)
    return Analysis(**values)


def test_fewer_than_min_requests_on_either_side_is_inconclusive() -> None:
    enough = Reading(50, 0, 1.0)
    short = Reading(49, 0, 1.0)
    assert judge(enough, enough, analysis(), 0).result == PASSED
    assert judge(short, enough, analysis(), 0).result == INCONCLUSIVE
    check = judge(enough, short, analysis(), 0)
    assert check.result == INCONCLUSIVE
    assert check.reason == "not enough traffic: canary 49 requests, baseline 50 (min_requests 50)"
    # Even a canary failing every request is not judged on too few of them.
    assert judge(enough, Reading(49, 49, 900.0), analysis(), 0).result == INCONCLUSIVE


@pytest.mark.parametrize(
    ("canary", "result"),
    [
        (Reading(120, 0, 2.0), PASSED),
        (Reading(120, 60, 2.0), FAILED),
        (Reading(3, 0, 2.0), INCONCLUSIVE),
    ],
)
def test_a_check_carries_its_time_and_both_readings(canary: Reading, result: str) -> None:
    """What GET .../release shows of each check: when, and what each side measured."""
    baseline = Reading(100, 1, 1.5)
    check = judge(baseline, canary, analysis(), 12.5)
    assert (check.at, check.result, check.baseline, check.canary) == (
        12.5,
        result,
        baseline,
        canary,
    )


@pytest.mark.parametrize(
    ("baseline_errors", "canary_errors", "result"),
    [(0, 1, PASSED), (0, 2, FAILED), (5, 6, PASSED), (5, 7, FAILED), (7, 0, PASSED)],
)
def test_error_rate_exactly_max_increase_above_the_baseline_passes(
    baseline_errors: int, canary_errors: int, result: str
) -> None:
    check = judge(
        Reading(100, baseline_errors, 1.0), Reading(100, canary_errors, 1.0), analysis(), 0
    )
    assert check.result == result


def test_a_failed_error_rate_names_the_metric_and_both_values() -> None:
    check = judge(Reading(200, 0, 3.0), Reading(100, 25, 3.0), analysis(latency_p99=None), 7.5)
    assert check.result == FAILED
    assert check.reason == "error_rate: canary 0.25 > baseline 0.00 + 0.01"
    assert check.at == 7.5
    passed = judge(Reading(300, 1, 3.0), Reading(300, 1, 3.0), analysis(latency_p99=None), 0)
    assert passed.reason == "error_rate: canary 0.0033 <= baseline 0.0033 + 0.01"


@pytest.mark.parametrize(
    ("baseline_p99", "canary_p99", "result"),
    [
        (10.0, 15.0, PASSED),  # exactly 1.5 x
        (10.0, 15.001, FAILED),
        (2.0, 5.0, PASSED),  # under min_ms, whatever the ratio
        (2.0, 5.001, FAILED),
        (0.1, 0.3, PASSED),
    ],
)
def test_latency_exactly_at_its_bound_passes(
    baseline_p99: float, canary_p99: float, result: str
) -> None:
    check = judge(Reading(100, 0, baseline_p99), Reading(100, 0, canary_p99), analysis(), 0)
    assert check.result == result


def test_a_failed_latency_names_the_metric_and_both_values_and_both_failures_are_named() -> None:
    check = judge(Reading(100, 0, 10.0), Reading(100, 50, 31.5), analysis(), 0)
    assert check.result == FAILED
    assert check.reason == (
        "error_rate: canary 0.50 > baseline 0.00 + 0.01; "
        "latency_p99: canary 31.5ms > max(1.5 x baseline 10ms, 5ms) = 15ms"
    )


def test_the_ratio_is_exact_for_decimal_values() -> None:
    # 1.1 x 10.0 is 11.000000000000002 in floats: a canary at exactly 11 ms must pass.
    limits = analysis(error_rate=None, latency_p99=LatencyCheck(1.1, 0.0))
    assert judge(Reading(100, 0, 10.0), Reading(100, 0, 11.0), limits, 0).result == PASSED


# ---------------------------------------------------------------------------- the machine


class Run:
    """A release driven by hand: each call is one event at a later time."""

    def __init__(self, spec: ReleaseSpec, weight: float = 0.0) -> None:
        self.spec = spec
        self.now = 1000.0
        outcome = start("web", spec, self.now, weight)
        self.release = outcome.release
        self.actions: list[Action] = list(outcome.actions)

    def at(self, seconds: float, event: Event) -> tuple[Action, ...]:
        self.now = 1000.0 + seconds
        outcome = advance(self.release, self.spec, self.now, event)
        self.release = outcome.release
        self.actions += outcome.actions
        return outcome.actions

    def measured(self, seconds: float, baseline: Reading, canary: Reading) -> tuple[Action, ...]:
        interval = self.spec.analysis.interval if self.spec.analysis else 1.0
        return self.at(seconds, Measured(1000.0 + seconds - interval, baseline, canary))

    @property
    def state(self) -> str:
        return self.release.state

    def weights(self) -> list[dict[str, float]]:
        return [dict(a.weights) for a in self.actions if isinstance(a, SetWeights)]


def test_steps_advance_on_their_pauses_alone_without_analysis() -> None:
    run = Run(
        spec_of(steps=[{"weight": 10, "pause": 5}, {"weight": 50, "pause": 5}, {"weight": 100}])
    )
    assert run.weights() == [{"stable": 90, "canary": 10}]
    assert run.state == PROGRESSING and run.release.reason.endswith("pausing 5s")
    assert run.at(4.999, Tick()) == ()
    assert run.at(5, Tick()) == (SetWeights({"stable": 50, "canary": 50}),)
    assert run.release.step == 1
    assert run.at(10, Tick()) == (SetWeights({"stable": 0, "canary": 100}),)
    assert run.state == PROMOTED and run.release.weight == 100
    assert run.release.reason == "promoted: canary has all traffic (3 steps)"


def test_a_step_ends_only_after_its_pause_and_a_passing_check_within_it() -> None:
    spec = spec_of(steps=[{"weight": 10, "pause": 3}, {"weight": 100}], analysis=ANALYSIS)
    run = Run(spec)
    assert run.measured(1, GOOD, GOOD) == ()  # passed, but the pause is not over
    assert run.release.passed and run.release.reason.endswith("pausing 3s")
    assert run.at(2.999, Tick()) == ()
    assert run.at(3, Tick()) == (SetWeights({"stable": 0, "canary": 100}),)
    assert run.state == PROMOTED


def test_a_check_that_began_before_the_step_does_not_let_it_end() -> None:
    spec = spec_of(steps=[{"weight": 10}, {"weight": 20}, {"weight": 100}], analysis=ANALYSIS)
    run = Run(spec)  # step 1 set at t=0
    run.at(2, Measured(999.5, GOOD, GOOD))  # began half a second before the step
    assert run.release.step == 0 and not run.release.passed
    assert run.release.reason == "step 1 of 3 (canary 10%): waiting for a passing check"
    run.at(3, Measured(1002.0, GOOD, GOOD))
    assert run.release.step == 1 and run.weights()[-1] == {"stable": 80, "canary": 20}
    run.at(3.5, Measured(1002.5, GOOD, GOOD))  # began 0.5 s before step 2 (set at 3)
    assert run.release.step == 1
    run.at(4, Measured(1003.0, GOOD, GOOD))  # began exactly when step 2 was set: it counts
    assert run.state == PROMOTED


def test_the_latest_check_must_have_passed_not_any_earlier_one() -> None:
    spec = spec_of(steps=[{"weight": 10, "pause": 2}, {"weight": 100}], analysis=ANALYSIS)
    run = Run(spec)
    run.measured(1, GOOD, GOOD)
    run.measured(2, FEW, FEW)  # the pause is over, but the latest check is inconclusive
    assert run.release.step == 0 and run.state == PROGRESSING
    run.measured(3, GOOD, GOOD)
    assert run.state == PROMOTED


def test_failure_limit_failed_checks_roll_back_in_the_same_step() -> None:
    spec = spec_of(
        steps=[{"weight": 10}, {"weight": 30}, {"weight": 100}],
        analysis={**ANALYSIS, "failure_limit": 2},
    )
    run = Run(spec)
    run.measured(1, GOOD, BROKEN)
    assert run.state == PROGRESSING and run.release.failures == 1
    run.measured(2, GOOD, GOOD)  # passing checks do not forgive a failure
    assert run.release.step == 1
    actions = run.measured(3, GOOD, BROKEN)
    assert run.state == ROLLED_BACK and run.release.failures == 2
    assert actions[0] == SetWeights({"stable": 100, "canary": 0})
    assert run.release.weight == 0
    assert run.release.reason == (
        "rolled back at step 2 of 3 (canary 30%): error_rate: canary 0.25 > baseline 0.00 + 0.01 "
        "(2 failed checks, failure_limit 2)"
    )
    assert run.release.updated_at == run.now  # in the same event as the failing check
    assert [check.result for check in run.release.checks] == [FAILED, PASSED, FAILED]


def test_one_failure_under_the_limit_does_not_roll_back() -> None:
    run = Run(spec_of(analysis={**ANALYSIS, "failure_limit": 1}))
    run.measured(1, GOOD, BROKEN)
    assert run.state == ROLLED_BACK


def test_max_inconclusive_in_a_row_pauses_for_lack_of_traffic_and_resume_goes_on() -> None:
    spec = spec_of(analysis={**ANALYSIS, "max_inconclusive": 3})
    run = Run(spec)
    run.measured(1, GOOD, FEW)
    run.measured(2, FEW, GOOD)
    assert run.state == PROGRESSING and run.release.inconclusive == 2
    assert run.release.failures == 0
    run.measured(3, FEW, FEW)
    assert run.state == PAUSED
    assert run.release.reason.startswith("paused: not enough traffic (3 inconclusive checks")
    assert "canary 3 requests, baseline 3 (min_requests 50)" in run.release.reason
    run.measured(4, FEW, FEW)
    assert run.state == PAUSED  # while paused, checks go on but nothing advances
    run.at(5, Resume("ops"))
    assert run.state == PROGRESSING and run.release.inconclusive == 0
    run.measured(6, GOOD, GOOD)
    assert run.state == PROMOTED


def test_a_conclusive_check_ends_the_inconclusive_streak() -> None:
    run = Run(
        spec_of(
            steps=[{"weight": 10, "pause": 60}, {"weight": 100}],
            analysis={**ANALYSIS, "max_inconclusive": 2},
        )
    )
    run.measured(1, FEW, FEW)
    run.measured(2, GOOD, GOOD)
    run.measured(3, FEW, FEW)
    assert run.state == PROGRESSING and run.release.inconclusive == 1
    run.measured(4, GOOD, BROKEN)
    run.measured(5, FEW, FEW)
    assert run.state == PROGRESSING and run.release.inconclusive == 1


def test_a_failing_check_while_paused_still_rolls_back() -> None:
    run = Run(spec_of(analysis={**ANALYSIS, "failure_limit": 1}))
    run.at(1, Pause("ops"))
    assert run.state == PAUSED and run.release.reason.startswith("paused by ops")
    run.measured(2, GOOD, BROKEN)
    assert run.state == ROLLED_BACK and run.weights()[-1] == {"stable": 100, "canary": 0}


def test_an_approval_step_waits_until_approved() -> None:
    run = Run(spec_of(steps=[{"weight": 50, "approval": True}, {"weight": 100}]))
    assert run.state == WAITING
    assert run.release.reason == (
        "waiting for approval of step 1 of 2 (canary 50%): POST .../release/approve"
    )
    assert run.at(100, Tick()) == ()
    assert run.state == WAITING
    run.at(101, Approve("ops"))
    assert run.state == PROMOTED


def test_an_early_approval_still_waits_for_the_pause_and_the_check() -> None:
    spec = spec_of(
        steps=[{"weight": 50, "pause": 5, "approval": True}, {"weight": 100}], analysis=ANALYSIS
    )
    run = Run(spec)
    run.at(1, Approve("ops"))
    assert run.state == PROGRESSING and run.release.approved
    run.measured(5, GOOD, GOOD)
    assert run.state == PROMOTED


def test_approve_applies_only_to_a_step_that_wants_it_once() -> None:
    run = Run(
        spec_of(
            steps=[{"weight": 10, "pause": 9}, {"weight": 50, "approval": True}, {"weight": 100}]
        )
    )
    with pytest.raises(Refused, match=r"step 1 of 3 \(canary 10%\) needs no approval"):
        run.at(1, Approve())
    run.at(9, Tick())
    assert run.state == WAITING
    run.at(10, Pause("ops"))
    run.at(11, Approve("ops"))  # recorded while paused...
    assert run.state == PAUSED and run.release.approved
    with pytest.raises(Refused, match="already approved"):
        run.at(12, Approve())
    run.at(13, Resume("ops"))  # ...and used on resume
    assert run.state == PROMOTED


def test_blue_green_switches_only_once_approved() -> None:
    run = Run(spec_of(steps=[{"weight": 100, "approval": True}]))
    assert run.state == WAITING and run.weights() == []
    assert run.release.stage == APPROVAL
    run.at(30, Approve("ops"))
    assert run.state == PROMOTED
    assert run.weights() == [{"stable": 0, "canary": 100}]


def test_a_refused_gate_holds_the_weight_and_is_asked_again_each_interval() -> None:
    spec = spec_of(
        steps=[{"weight": 10}, {"weight": 100}],
        analysis={**ANALYSIS, "interval": "2s"},
        webhooks=[{"phase": "confirm-step", "url": "http://h/gate"}],
    )
    run = Run(spec)
    assert run.actions == [Ask(CONFIRM_STEP)] and run.state == PROGRESSING
    run.at(0.5, Answered(CONFIRM_STEP, False, "http://h/gate answered 500"))
    assert run.state == WAITING and run.weights() == []
    assert run.release.reason == (
        "waiting for the confirm-step webhooks of step 1: http://h/gate answered 500; "
        "asked again every 2s"
    )
    assert run.at(2.4, Tick()) == ()
    assert run.at(2.5, Tick()) == (Ask(CONFIRM_STEP),)
    assert run.at(3, Tick()) == ()  # asked, not yet answered: not asked twice
    run.at(3.5, Answered(CONFIRM_STEP, True, "answered 200"))
    assert run.state == PROGRESSING and run.weights() == [{"stable": 90, "canary": 10}]


def test_the_promotion_asks_confirm_step_then_confirm_promotion_other_steps_confirm_step() -> None:
    hooks = [
        {"phase": "confirm-step", "url": "http://h/step"},
        {"phase": "confirm-promotion", "url": "http://h/promotion"},
    ]
    spec = spec_of(steps=[{"weight": 10}, {"weight": 100, "approval": True}], webhooks=hooks)
    assert step_stages(spec, 0) == (CONFIRM_STEP, RUNNING)
    assert step_stages(spec, 1) == (APPROVAL, CONFIRM_STEP, CONFIRM_PROMOTION, RUNNING)
    run = Run(spec)
    run.at(1, Answered(CONFIRM_STEP, True))
    assert run.state == WAITING and run.release.stage == APPROVAL
    assert run.at(2, Approve()) == (Ask(CONFIRM_STEP),)
    assert run.at(3, Answered(CONFIRM_STEP, True)) == (Ask(CONFIRM_PROMOTION),)
    assert run.at(4, Answered(CONFIRM_STEP, True)) == ()  # stale: not what is asked
    assert run.at(5, Answered(CONFIRM_PROMOTION, True)) == (
        SetWeights({"stable": 0, "canary": 100}),
    )
    assert run.state == PROMOTED


def test_a_refused_pre_release_fails_the_release_before_any_change() -> None:
    spec = spec_of(analysis=ANALYSIS, webhooks=[{"phase": "pre-release", "url": "http://h/pre"}])
    run = Run(spec, weight=10)
    assert run.actions == [Ask(PRE_RELEASE)]
    run.measured(1, GOOD, BROKEN)  # nothing is judged before the release's first weight
    assert run.release.checks == () and run.release.failures == 0
    run.at(2, Answered(PRE_RELEASE, False, "http://h/pre answered 503"))
    assert run.state == ABORTED and run.weights() == []
    assert run.release.weight == 10  # as it was
    assert run.release.reason == (
        "aborted: the pre-release webhooks refused (http://h/pre answered 503); nothing was changed"
    )


def test_a_pause_forgets_the_pending_question_and_resume_asks_it_again() -> None:
    spec = spec_of(webhooks=[{"phase": "pre-release", "url": "http://h/pre"}])
    run = Run(spec)
    run.at(1, Pause("ops"))
    assert run.at(2, Answered(PRE_RELEASE, True)) == ()  # asked before the pause: stale
    assert run.state == PAUSED
    assert run.at(3, Resume("ops")) == (Ask(PRE_RELEASE),)
    run.at(4, Answered(PRE_RELEASE, True))
    assert run.weights() == [{"stable": 90, "canary": 10}, {"stable": 0, "canary": 100}]


def test_abort_gives_the_baseline_all_traffic_unless_told_not_to() -> None:
    held = [{"weight": 10, "pause": 60}, {"weight": 100}]
    run = Run(spec_of(steps=held))
    assert run.at(1, Abort("ops")) == (SetWeights({"stable": 100, "canary": 0}),)
    assert run.state == ABORTED
    assert run.release.reason == "aborted by ops; stable has all traffic again"
    forced = Run(spec_of(steps=held))
    assert forced.at(1, Abort("ops", restore=False, why="PUT weights with force=true")) == ()
    assert forced.release.reason == "aborted by ops: PUT weights with force=true"
    assert forced.release.weight == 10
    waiting = Run(spec_of(webhooks=[{"phase": "pre-release", "url": "http://h/pre"}]))
    assert waiting.at(1, Abort("ops")) == ()  # nothing was changed: nothing to restore


def test_commands_that_do_not_apply_are_refused_and_change_nothing() -> None:
    run = Run(spec_of(steps=[{"weight": 10, "pause": 60}, {"weight": 100}]))
    with pytest.raises(Refused, match="is progressing: cannot resume"):
        run.at(1, Resume())
    run.at(2, Pause())
    with pytest.raises(Refused, match="is paused: cannot pause"):
        run.at(3, Pause())
    run.at(4, Abort())
    before = run.release
    for command in (Approve(), Pause(), Resume(), Abort()):
        with pytest.raises(Refused, match=r"is over \(aborted\)"):
            run.at(5, command)
    assert run.release is before
    assert advance(before, run.spec, 9999, Tick()) == Outcome(before)


def test_notices_follow_changes() -> None:
    hooks = [{"phase": p, "url": f"http://h/{p}"} for p in ("event", "rollback", "post-release")]
    spec = spec_of(
        steps=[{"weight": 10}, {"weight": 100}],
        analysis={**ANALYSIS, "failure_limit": 1},
        webhooks=hooks,
    )
    run = Run(spec)
    assert run.actions == [SetWeights({"stable": 90, "canary": 10}), Notify("event")]
    assert run.measured(1, FEW, FEW) == ()  # no change of state, step or weight: no notice
    assert run.measured(2, GOOD, BROKEN) == (
        SetWeights({"stable": 100, "canary": 0}),
        Notify("event"),
        Notify("rollback"),
        Notify("post-release"),
    )
    promoted = Run(spec)
    assert promoted.measured(1, GOOD, GOOD) == (
        SetWeights({"stable": 0, "canary": 100}),
        Notify("event"),
        Notify("post-release"),
    )


def test_a_release_reads_as_the_api_shows_it_and_its_state_reads_back() -> None:
    run = Run(spec_of(steps=[{"weight": 10}, {"weight": 100}], analysis=ANALYSIS))
    run.measured(0.5, FEW, GOOD)
    shown = release_json(run.release, run.spec)
    assert {k: shown[k] for k in ("state", "step", "steps", "weight", "canary", "baseline")} == {
        "state": "progressing",
        "step": 0,
        "steps": 2,
        "weight": 10,
        "canary": "canary",
        "baseline": "stable",
    }
    assert shown["failures"] == 0 and shown["approval"] is None
    assert shown["started_at"] == "1970-01-01T00:16:40.000Z"
    assert shown["checks"] == [
        {
            "at": "1970-01-01T00:16:40.500Z",
            "result": "inconclusive",
            "baseline": {"requests": 3, "errors": 0, "error_rate": 0.0, "p99_ms": 5.0},
            "canary": {"requests": 100, "errors": 0, "error_rate": 0.0, "p99_ms": 5.0},
            "reason": "not enough traffic: canary 100 requests, baseline 3 (min_requests 50)",
        }
    ]
    assert release_from_state(release_state(run.release)) == run.release
    with pytest.raises(ValueError, match="not a release state"):
        release_from_state({**release_state(run.release), "state": "dancing"})


def test_only_the_last_twenty_checks_are_kept() -> None:
    run = Run(
        spec_of(
            steps=[{"weight": 10, "pause": 3600}, {"weight": 100}],
            analysis={**ANALYSIS, "max_inconclusive": 99},
        )
    )
    for second in range(1, 26):
        run.measured(second, GOOD, Reading(second, 0, 1.0))
    assert len(run.release.checks) == 20
    assert run.release.checks[0].canary.requests == 6


# ---------------------------------------------------------------------------- the table as data


def reachable() -> set[str]:
    seen = set(STARTS)
    frontier = list(STARTS)
    while frontier:
        for targets in TRANSITIONS.get(frontier.pop(), {}).values():
            for target in targets - seen:
                seen.add(target)
                frontier.append(target)
    return seen


def test_every_state_is_reachable_and_only_active_ones_move() -> None:
    assert reachable() == set(STATES)
    assert set(TRANSITIONS) == ACTIVE
    assert set(STATES) == ACTIVE | FINAL and not ACTIVE & FINAL


def test_abort_ends_every_active_state_and_nothing_leaves_a_final_one() -> None:
    for state in ACTIVE:
        assert TRANSITIONS[state]["abort"] == {ABORTED}
    for state in FINAL:
        assert state not in TRANSITIONS


def test_commands_are_in_the_table_exactly_where_they_apply() -> None:
    for command in COMMANDS:
        in_table = {state for state, moves in TRANSITIONS.items() if command in moves}
        assert in_table == COMMAND_STATES[command]


def test_only_measurements_roll_back_and_only_pre_release_answers_or_aborts_abort() -> None:
    for state, moves in TRANSITIONS.items():
        for kind, targets in moves.items():
            assert (ROLLED_BACK in targets) == (kind == "measured"), (state, kind)
            if ABORTED in targets:
                assert kind in ("abort", "answered") and (kind == "abort" or state == PROGRESSING)
    assert TRANSITIONS[PAUSED]["tick"] == {PAUSED}  # time does not move a paused release


# ---------------------------------------------------------------------------- properties


readings = st.one_of(
    st.sampled_from([GOOD, FEW, BROKEN]),
    st.builds(
        lambda requests, errors, p99: Reading(requests, min(errors, requests), p99),
        st.integers(0, 120),
        st.integers(0, 40),
        st.sampled_from([1.0, 5.0, 10.0, 50.0]),
    ),
)
measurements = st.builds(Measured, st.just(0.0), readings, readings)
# "asked": the phase the release asks for right then (any other answer is stale).
answers = st.builds(
    Answered,
    st.sampled_from([*ASKED_PHASES, "asked", "asked"]),
    st.sampled_from([True, True, False]),
)
# An abort ends everything: one event in about a hundred.
aborts = st.tuples(st.integers(0, 9), st.builds(Abort, restore=st.booleans())).map(
    lambda drawn: drawn[1] if drawn[0] == 0 else Tick()
)
# Repeated branches are drawn more often: mostly time and traffic, now and then a person.
events = st.one_of(
    st.builds(Tick),
    measurements,
    measurements,
    measurements,
    measurements,
    measurements,
    answers,
    answers,
    st.builds(Approve),
    st.builds(Approve),
    st.builds(Pause),
    st.builds(Resume),
    st.builds(Resume),
    aborts,
)


def waits_on_something(release: Release) -> bool:
    if release.state == WAITING:
        return "approval" in release.reason or any(p in release.reason for p in ASKED_PHASES)
    if release.state == PAUSED:
        return release.reason.startswith("paused")
    return bool(release.reason)


def check_weights(actions: Sequence[Action], spec: ReleaseSpec) -> Iterator[float]:
    """Each SetWeights: baseline and canary only, summing to 100, each a valid weight."""
    for action in actions:
        if isinstance(action, SetWeights):
            assert set(action.weights) == {"stable", "canary"}
            assert math.isclose(sum(action.weights.values()), 100.0)
            assert all(weight_problem(w) is None for w in action.weights.values())
            yield action.weights["canary"]


def cooperate(release: Release, spec: ReleaseSpec, now: float) -> Event:
    """What a helpful world does next: resume, approve, answer yes, report good traffic."""
    if release.state == PAUSED:
        return Resume()
    if release.stage == APPROVAL or (
        release.stage == RUNNING and spec.steps[release.step].approval and not release.approved
    ):
        return Approve()
    if release.asking:
        return Answered(release.stage, True)
    if spec.analysis is not None and release.stage == RUNNING:
        return Measured(release.step_started_at, GOOD, GOOD)
    return Tick()


@settings(max_examples=300)
@given(
    specs(),
    st.lists(st.tuples(st.sampled_from([0.1, 0.5, 3, 61]), events), min_size=10, max_size=60),
)
def test_any_run_keeps_the_invariants_and_a_helpful_world_always_ends_it(
    spec: ReleaseSpec, script: list[tuple[float, Event]]
) -> None:
    now = 0.0
    outcome = start("web", spec, now, 0.0)
    release = outcome.release
    canary = list(check_weights(outcome.actions, spec))
    limit = spec.analysis.failure_limit if spec.analysis else 1
    for delay, event in script:
        now += delay
        if isinstance(event, Measured):
            event = Measured(now - delay, event.baseline, event.canary)
        if isinstance(event, Answered) and event.phase == "asked":
            event = Answered(release.stage, event.ok)
        before = release
        try:
            outcome = advance(release, spec, now, event)
        except Refused:
            assert event.kind in COMMANDS
            continue
        release = outcome.release
        if before.state in FINAL:
            assert outcome == Outcome(before)
        weights = list(check_weights(outcome.actions, spec))
        if release.state in (ROLLED_BACK, ABORTED) and before.state in ACTIVE:
            assert weights in ([], [0.0])
        else:
            assert weights == sorted(weights) and all(w >= max(canary, default=0) for w in weights)
        canary += weights
        assert release.failures <= limit
        assert (release.failures == limit) == (release.state == ROLLED_BACK)
        assert len(release.checks) <= 20
        assert waits_on_something(release), release
    event_note(f"after the script: {release.state}")
    for _ in range(6 * len(spec.steps) + 6):
        if release.state in FINAL:
            break
        now += 61
        release = advance(release, spec, now, cooperate(release, spec, now)).release
    assert release.state in FINAL


# ---------------------------------------------------------------------------- the examples


CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def test_the_release_examples_are_what_their_comments_say() -> None:
    canary = load_config(str(CONFIG_DIR / "canary-release.yaml")).services[0].release
    assert canary is not None
    assert [(s.weight, s.approval) for s in canary.steps] == [
        (5, False),
        (25, False),
        (50, True),
        (100, False),
    ]
    assert canary.analysis is not None and canary.analysis.interval == 10
    (blue_green,) = load_config(str(CONFIG_DIR / "blue-green-release.yaml")).services
    assert blue_green.release is not None
    assert blue_green.release.steps == (Step(100, 0, True),)
    assert step_stages(blue_green.release, 0) == (APPROVAL, RUNNING)
    (ab,) = load_config(str(CONFIG_DIR / "ab-release.yaml")).services
    assert ab.release is not None and ab.rules
    assert {rule.version for rule in ab.rules} == {ab.release.canary}
    assert [s.weight for s in ab.release.steps] == [10, 50, 100]


def test_a_release_in_the_file_is_refused_with_every_error_its_path_and_line() -> None:
    text = """\
services:
  - name: web
    versions:
      stable: {endpoints: ["127.0.0.1:9001"]}
      canary: {endpoints: ["127.0.0.1:9101"]}
    release:
      canary: canary
      canary: stable
      steps:
        - {weight: 50, pause: 1m}
        - weight: 40
        - {weight: 120}
      analysis:
        interval: 0s
        error_rate: {max_increase: 0.01}
      webhooks:
        - {phase: confirm-step, url: "127.0.0.1:9000/gate"}
      extra: 1
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [
        "services[0].release.canary: line 8: duplicate key (first at line 7)",
        "services[0].release.steps[1].weight: line 11: must be above the previous step's (50):"
        " steps only rise",
        "services[0].release.steps[2].weight: line 12: must be at most 100 (percent)",
        "services[0].release.analysis.interval: line 14: must be greater than zero",
        "services[0].release.webhooks[0].url: line 17: '127.0.0.1:9000/gate': expected an"
        " http:// or https:// URL with a host",
        "services[0].release.extra: line 18: unknown key (expected: canary, steps, analysis,"
        " webhooks)",
    ]
    # The baseline is the service's (its first version here): a release of it is refused.
    with pytest.raises(ConfigError, match=r"release.canary: line 7: 'stable' is the service's"):
        parse_config(text.replace("      canary: canary\n", ""))


@pytest.mark.parametrize(
    ("pause", "shown"),
    [
        ("250ms", "250ms"),
        ("999ms", "999ms"),
        ("1s", "1s"),
        ("90s", "90s"),
        ("2m", "2m"),
        (61, "61s"),
    ],
)
def test_a_pausing_step_says_how_long_in_the_units_a_config_uses(pause: object, shown: str) -> None:
    spec = spec_of(steps=[{"weight": 10, "pause": pause}, {"weight": 100}])
    assert start("web", spec, 0.0, 0.0).release.reason.endswith(f": pausing {shown}")
