"""Fleets: three real grayproxy processes on loopback driven as one by `grayproxy ctl --url`.

The same key gets the same version on every replica; a change goes to every replica with
If-Match of its own read and is reported per replica; a replica down or a stale If-Match is
reported and the others still change; a name that does not resolve changes nothing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from proxy.ctl import ControlCallFailed
from proxy.fleet import resolve

from fleet import fleet_config, running_fleet, served_by, service, urls, weights
from procs import ProxyProcess, http_get, run_cli
from servers import Upstream


def set_everywhere(replicas: Sequence[ProxyProcess], *pairs: str) -> None:
    result = run_cli("ctl", "--url", urls(replicas), "weights", "web", *pairs)
    assert result.returncode == 0, result.stdout + result.stderr


def in_effect(replica: ProxyProcess) -> bool:
    """stable=0 canary=100 in its API, and real traffic served by the canary alone."""
    served = {served_by(replica, f"user-{n}") for n in range(30)}
    return weights(replica) == {"stable": 0, "canary": 100} and served == {"canary"}


def config_on(upstreams: dict[str, Upstream]) -> str:
    return fleet_config(upstreams["stable"].address, upstreams["canary"].address)


@pytest.fixture(scope="module")
def replicas(upstreams: dict[str, Upstream]) -> Iterator[list[ProxyProcess]]:
    with running_fleet(config_on(upstreams)) as fleet:
        yield fleet


@pytest.fixture
def fleet(replicas: list[ProxyProcess]) -> list[ProxyProcess]:
    """The three replicas at stable=50 canary=50 again."""
    set_everywhere(replicas, "stable=50", "canary=50")
    return replicas


def test_the_same_key_gets_the_same_version_on_every_replica(fleet: list[ProxyProcess]) -> None:
    seen = {}
    for number in range(200):
        user = f"user-{number}"
        versions = {served_by(replica, user) for replica in fleet}
        assert len(versions) == 1, (user, versions)
        seen[user] = versions.pop()
    assert set(seen.values()) == {"stable", "canary"}  # the split is 50/50: both serve


def test_a_fleet_wide_weight_change_is_in_effect_on_every_replica(
    fleet: list[ProxyProcess],
) -> None:
    before = [service(replica)["generation"] for replica in fleet]
    result = run_cli("ctl", "--url", urls(fleet), "weights", "web", "stable=0", "canary=100")
    done = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{replica.control_url}: ok generation {generation + 1}"
        for replica, generation in zip(fleet, before, strict=True)
    ]
    while not all(in_effect(replica) for replica in fleet):
        assert time.monotonic() < done + 2.0, [weights(replica) for replica in fleet]
        time.sleep(0.05)
    for replica in fleet:  # each replica's audit names the change once
        _, _, body = http_get(f"{replica.control_url}/api/v1/audit?limit=1")
        assert json.loads(body)["records"][0]["after"] == {"stable": 0, "canary": 100}


def test_a_replica_down_is_reported_and_the_others_change(
    fleet: list[ProxyProcess], upstreams: dict[str, Upstream]
) -> None:
    with ProxyProcess(config_on(upstreams)) as gone:
        down = gone.control_url
    result = run_cli(
        "ctl", "--url", f"{urls(fleet[:2])},{down}", "weights", "web", "stable=80", "canary=20"
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{fleet[0].control_url}: ok generation ")
    assert lines[1].startswith(f"{fleet[1].control_url}: ok generation ")
    assert lines[2] == (
        f"{down}: failed: cannot reach the control API at {down}: connection refused"
    )
    assert weights(fleet[0]) == weights(fleet[1]) == {"stable": 80, "canary": 20}
    assert weights(fleet[2]) == {"stable": 50, "canary": 50}  # not named: untouched


def test_a_name_that_does_not_resolve_changes_nothing(fleet: list[ProxyProcess]) -> None:
    before = [service(replica) for replica in fleet]
    result = run_cli(
        "ctl", "--url", f"{urls(fleet)},dns+http://no-such-replica.invalid:9901",
        "weights", "web", "stable=0", "canary=100",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        "grayproxy ctl: cannot resolve 'no-such-replica.invalid' "
        "(dns+http://no-such-replica.invalid:9901): "
    )
    assert "nothing was sent to any replica" in result.stderr
    for replica, was in zip(fleet, before, strict=True):
        assert service(replica)["generation"] == was["generation"]
        assert weights(replica) == {"stable": 50, "canary": 50}


def test_dns_names_every_address_of_a_name(fleet: list[ProxyProcess]) -> None:
    port = fleet[0].control_port
    result = run_cli(
        "ctl", "--url", f"dns+http://localhost:{port}", "weights", "web", "stable=70", "canary=30"
    )
    assert result.returncode == 0, result.stderr
    generation = service(fleet[0])["generation"]
    # localhost: 127.0.0.1 (and ::1 only where no IPv4 address is given: one family)
    assert result.stdout == f"http://127.0.0.1:{port}: ok generation {generation}\n"
    assert weights(fleet[0]) == {"stable": 70, "canary": 30}
    assert weights(fleet[1]) == {"stable": 50, "canary": 50}


def test_a_stale_if_match_is_refused_by_that_replica_alone(fleet: list[ProxyProcess]) -> None:
    first = service(fleet[0])["generation"]
    for share in (60, 61):  # fleet[1] moves on alone, to another generation than fleet[0]
        moved = run_cli(
            "ctl", "--url", fleet[1].control_url, "weights", "web",
            f"stable={share}", f"canary={100 - share}",
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        if service(fleet[1])["generation"] != first:
            break
    generations = [service(replica)["generation"] for replica in fleet]
    result = run_cli(
        "ctl", "--url", urls(fleet), "weights", "web", "stable=10", "canary=90",
        "--if-match", str(first),
    )  # fmt: skip
    assert result.returncode == 1
    for replica, line, generation in zip(
        fleet, result.stdout.splitlines(), generations, strict=True
    ):
        if generation == first:
            assert line == f"{replica.control_url}: ok generation {first + 1}"
            assert weights(replica) == {"stable": 10, "canary": 90}
        else:
            assert line.startswith(
                f"{replica.control_url}: failed: HTTP 412: precondition failed: "
                f'If-Match "{first}" does not match the current generation {generation}'
            )
            assert service(replica)["generation"] == generation  # nothing changed there
    assert weights(fleet[1]) == {"stable": share, "canary": 100 - share}


def test_status_is_shown_per_replica_and_says_where_they_disagree(
    fleet: list[ProxyProcess],
) -> None:
    agreed = run_cli("ctl", "--url", urls(fleet), "status", "web")
    assert agreed.returncode == 0, agreed.stderr
    for replica in fleet:
        assert f"== {replica.control_url}\nweb  generation " in agreed.stdout
    assert agreed.stdout.rstrip().endswith("the 3 replicas that answered agree on every weight")
    run_cli("ctl", "--url", fleet[2].control_url, "weights", "web", "stable=100", "canary=0")
    split = run_cli("ctl", "--url", urls(fleet), "status", "web")
    assert split.stdout.rstrip().splitlines()[-1] == (
        "replicas disagree on web's weights: "
        f"{fleet[0].control_url} stable=50 canary=50; {fleet[1].control_url} stable=50 "
        f"canary=50; {fleet[2].control_url} stable=100 canary=0"
    )


def test_release_commands_go_to_every_replica(fleet: list[ProxyProcess], tmp_path: Any) -> None:
    spec = tmp_path / "release.yaml"
    spec.write_text("canary: canary\nsteps: [{weight: 20, approval: true}, {weight: 100}]\n")
    started = run_cli("ctl", "--url", urls(fleet), "release", "start", "web", "-f", str(spec))
    assert started.returncode == 0, started.stderr
    assert len(started.stdout.splitlines()) == 3
    aborted = run_cli("ctl", "--url", urls(fleet), "release", "abort", "web")
    assert aborted.returncode == 0, aborted.stderr
    for replica in fleet:
        _, _, body = http_get(f"{replica.control_url}/api/v1/services/web/release")
        assert json.loads(body)["state"] == "aborted"
    watch = run_cli("ctl", "--url", urls(fleet), "release", "status", "web", "--watch")
    assert watch.returncode == 1
    assert "status --watch follows one replica" in watch.stderr


# ---- resolving --url: the pure part, with the resolver's answers given ------------------------


def answers(*addresses: str) -> Any:
    def lookup(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return lookup


def test_a_name_gives_each_address_of_one_family_once() -> None:
    dual = answers("10.0.0.7", "fd00::7", "10.0.0.8", "10.0.0.7")
    targets = resolve("dns+http://gateway:9901", dual)
    assert targets.urls == ("http://10.0.0.7:9901", "http://10.0.0.8:9901")
    assert targets.fleet
    only_v6 = resolve("dns+https://gateway:9443", answers("fd00::7", "fd00::8"))
    assert only_v6.urls == ("https://[fd00::7]:9443", "https://[fd00::8]:9443")


def test_plain_urls_are_a_fleet_when_there_are_several() -> None:
    assert resolve("127.0.0.1:9901").urls == ("http://127.0.0.1:9901",)
    assert not resolve("http://127.0.0.1:9901/").fleet
    both = resolve("http://a:1, b:2,http://a:1")
    assert both.urls == ("http://a:1", "http://b:2") and both.fleet


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("http://a:1,,http://b:2", "--url 'http://a:1,,http://b:2': an empty URL in the list"),
        ("dns+http://gateway", "dns+http://gateway: expected dns+http://NAME:PORT"),
        ("dns+http://gateway:99999", "dns+http://gateway:99999: not a valid URL"),
    ],
)
def test_bad_targets_are_refused(option: str, message: str) -> None:
    with pytest.raises(ControlCallFailed) as refused:
        resolve(option, answers("10.0.0.1"))
    assert refused.value.message.startswith(message)
