"""The decision trace (x-grayproxy-decision) and explain, with a real proxy and upstreams.

Each reason the data path can give is provoked for real and read off the
response; explain is then checked against the data path itself: many seeded
random requests (headers, cookies, query, method, path and the client's own
address, 127.0.0.x) are sent through the proxy and asked of explain, and both
must name the same version for the same reason (a keyless random draw names
no version).
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config import ConfigError
from proxy.loader import parse_config
from proxy.routing import hash_version

from procs import DIRECT, ProxyProcess, free_port, run_cli
from servers import Upstream

WEIGHTS = {"stable": 70.0, "canary": 30.0}
SALT = "s1"
CONFIG = """
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: keyed
    match: {path_prefix: /keyed}
    decision_header: true
    versions: &versions
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split:
      weights: {stable: 70, canary: 30}
      hash_on: [{header: x-user-id}, {cookie: session}, {query: uid}, {client_ip: true}]
      salt: s1
    rules:
      - match: {header: {name: x-canary, value: always}}
        version: canary
      - name: qa-team
        match: {cookie: {name: team, value: qa}, method: [GET, HEAD]}
        version: canary
      - name: office
        match: {source: 127.0.0.128/25, path_prefix: /keyed/admin}
        version: stable
  - name: sticky
    match: {path_prefix: /sticky}
    decision_header: true
    versions: *versions
    split:
      weights: {stable: 50, canary: 50}
      hash_on: [{header: x-user-id}]
      sticky_cookie: {name: gp}
  - name: random
    match: {path_prefix: /random}
    decision_header: true
    versions: *versions
    split: {weights: {stable: 50, canary: 50}}
  - name: fallback
    match: {path_prefix: /fallback}
    decision_header: true
    fallback: stable
    # the dead endpoint fails at once; stable, served from this busy test process, must
    # not be taken out by a slow moment (a 200ms timeout did so once in CI: a 503)
    health_check: {interval: 100ms, timeout: 5s, unhealthy_threshold: 1}
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["127.0.0.1:%(dead)d"]}
    split: {weights: {stable: 0, canary: 100}}
  - name: quiet
    match: {path_prefix: /quiet}
    versions: *versions
"""


def config_text(upstreams: dict[str, Upstream], workers: int = 1) -> str:
    text = CONFIG % {
        "stable": upstreams["stable"].address,
        "canary": upstreams["canary"].address,
        "dead": free_port(),
    }
    return text.replace("services:", f"workers: {workers}\nservices:", 1)


@pytest.fixture(scope="module")
def proxy(upstreams: dict[str, Upstream]) -> Iterator[ProxyProcess]:
    with ProxyProcess(config_text(upstreams)) as running:
        yield running


def send(
    proxy: ProxyProcess,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    client_ip: str = "127.0.0.1",
) -> http.client.HTTPResponse:
    """One request from `client_ip` (any 127.0.0.x is this host), its response read."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", proxy.data_port, timeout=10, source_address=(client_ip, 0)
    )
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def decision_of(proxy: ProxyProcess, path: str, **kwargs: Any) -> tuple[str | None, str | None]:
    response = send(proxy, path, **kwargs)
    assert response.status == 200, response.status
    return response.headers["x-grayproxy-version"], response.headers["x-grayproxy-decision"]


def explain(proxy: ProxyProcess, service: str, body: object) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{proxy.control_url}/api/v1/services/{service}/explain", data=data, method="POST"
    )
    try:
        with DIRECT.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


# --------------------------------------------------------------------------- each reason


def test_rules_by_index_and_by_name(proxy: ProxyProcess) -> None:
    assert decision_of(proxy, "/keyed/x", headers={"x-canary": "always"}) == ("canary", "rule=0")
    qa = {"cookie": "team=qa; session=s"}
    assert decision_of(proxy, "/keyed/x", headers=qa) == ("canary", "rule=1;name=qa-team")
    office = decision_of(proxy, "/keyed/admin", client_ip="127.0.0.200")
    assert office == ("stable", "rule=2;name=office")


@pytest.mark.parametrize(
    ("path", "headers", "key", "reason"),
    [
        ("/keyed/x", {"x-user-id": "alice", "cookie": "session=s9"}, "alice", "header:x-user-id"),
        ("/keyed/x?uid=q1", {"cookie": "session=s9"}, "s9", "cookie:session"),
        ("/keyed/x?uid=q1", {}, "q1", "query:uid"),
        ("/keyed/x", {}, "127.0.0.7", "client_ip"),
    ],
)
def test_each_key_source_is_named_and_hashes_its_key(
    proxy: ProxyProcess, path: str, headers: dict[str, str], key: str, reason: str
) -> None:
    version, decision = decision_of(proxy, path, headers=headers, client_ip="127.0.0.7")
    assert decision == f"split;key={reason}"
    assert version == hash_version(key, WEIGHTS, SALT)


def test_a_sticky_key_is_named_when_drawn_and_when_sent_back(proxy: ProxyProcess) -> None:
    first = send(proxy, "/sticky/x")
    cookie = first.headers["set-cookie"].split(";")[0]
    assert cookie.startswith("gp=")
    assert first.headers["x-grayproxy-decision"] == "split;key=sticky"
    again = decision_of(proxy, "/sticky/x", headers={"cookie": cookie})
    assert again == (first.headers["x-grayproxy-version"], "split;key=sticky")


def test_a_random_draw_and_a_fallback_are_named(proxy: ProxyProcess) -> None:
    assert decision_of(proxy, "/random/x")[1] == "split;random"
    assert decision_of(proxy, "/fallback/x") == ("stable", "split;random;fallback=stable")


def test_no_decision_header_unless_the_service_asks(proxy: ProxyProcess) -> None:
    response = send(proxy, "/quiet/x", headers={"x-user-id": "alice"})
    assert response.status == 200
    assert response.headers["x-grayproxy-decision"] is None
    assert (
        parse_config("services: [{name: a, versions: {v: {endpoints: ['127.0.0.1:9']}}}]")
        .services[0]
        .decision_header
        is False
    )


def test_a_decision_header_is_on_errors_that_name_a_version(upstreams: dict[str, Upstream]) -> None:
    dead = free_port()
    config = f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: web
    decision_header: true
    versions: {{only: {{endpoints: ["127.0.0.1:{dead}"]}}}}
"""
    with ProxyProcess(config) as proxy:
        response = send(proxy, "/x")
    assert response.status == 502
    assert response.headers["x-grayproxy-decision"] == "split;random"


def test_rule_names_and_the_decision_header_are_checked_at_load() -> None:
    text = """
services:
  - name: web
    decision_header: "yes"
    versions: {a: {endpoints: ["127.0.0.1:9"]}}
    rules:
      - name: "has space"
        version: a
      - name: ok.name_1
        version: a
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    assert refused.value.errors == [
        "services[0].decision_header: line 4: expected true or false, got a string",
        "services[0].rules[0].name: line 7: 'has space': rule names may only contain "
        "A-Z, a-z, 0-9, '_', '.' and '-'",
    ]
    fixed = parse_config(text.replace('"yes"', "true").replace('"has space"', "first"))
    assert [rule.name for rule in fixed.services[0].rules] == ["first", "ok.name_1"]


def test_the_service_json_shows_rule_names(proxy: ProxyProcess) -> None:
    with DIRECT.open(f"{proxy.control_url}/api/v1/services/keyed", timeout=10) as response:
        rules = json.loads(response.read())["rules"]
    assert [rule.get("name") for rule in rules] == [None, "qa-team", "office"]


# --------------------------------------------------------------------------- explain


def random_request(rng: random.Random) -> dict[str, Any]:
    """A request's facts: what explain is asked and what the proxy is sent."""
    headers: dict[str, str] = {}
    if rng.random() < 0.4:
        headers["x-user-id"] = f"user-{rng.randrange(1000)}"
    if rng.random() < 0.2:
        headers["x-canary"] = rng.choice(["always", "never", "sometimes"])
    cookies = []
    if rng.random() < 0.3:
        cookies.append(f"session=s{rng.randrange(1000)}")
    if rng.random() < 0.2:
        cookies.append(f"team={rng.choice(['qa', 'dev'])}")
    if cookies:
        headers["cookie"] = "; ".join(cookies)
    path = rng.choice(["/keyed/", "/keyed/admin", "/keyed/admin/x", "/keyed/other"])
    if rng.random() < 0.3:
        path += f"?uid=u{rng.randrange(1000)}"
    elif rng.random() < 0.2:
        path += "?other=1"
    return {
        "method": rng.choice(["GET", "GET", "HEAD", "POST", "DELETE"]),
        "path": path,
        "headers": headers,
        "client_ip": f"127.0.0.{rng.randrange(1, 255)}",
    }


def test_explain_answers_what_the_data_path_does_for_random_requests(
    proxy: ProxyProcess,
) -> None:
    rng = random.Random(20261130)
    checked = 0
    for _ in range(150):
        facts = random_request(rng)
        status, answer = explain(proxy, "keyed", facts)
        assert status == 200, answer
        response = send(proxy, facts["path"], facts["headers"], facts["method"], facts["client_ip"])
        served = (response.headers["x-grayproxy-version"], response.headers["x-grayproxy-decision"])
        assert (answer["version"], answer["decision"]) == served, facts
        checked += 1
    assert checked == 150


@pytest.mark.parametrize("service", ["random", "sticky"])
def test_explain_says_a_keyless_draw_is_random(proxy: ProxyProcess, service: str) -> None:
    status, answer = explain(proxy, service, {"path": f"/{service}/x"})
    assert status == 200
    assert answer["version"] is None and answer["random"] is True
    assert answer["decision"] == ("split;random" if service == "random" else "split;key=sticky")
    assert answer["chances"] == {"stable": 50.0, "canary": 50.0}
    assert decision_of(proxy, f"/{service}/x")[1] == answer["decision"]
    # With the sticky cookie it is a key like any other.
    status, answer = explain(proxy, "sticky", {"headers": {"cookie": "gp=abc"}})
    assert (answer["version"], answer["random"]) == (
        hash_version("abc", {"stable": 50, "canary": 50}),
        False,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_explain_follows_endpoint_health_to_the_fallback(
    upstreams: dict[str, Upstream], workers: int
) -> None:
    with ProxyProcess(config_text(upstreams, workers)) as proxy:
        deadline = time.monotonic() + 15
        while True:  # until the health check has taken the dead endpoint out
            _, answer = explain(proxy, "fallback", {})
            if answer.get("version") == "stable" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer == {
            "version": "stable",
            "decision": "split;random;fallback=stable",
            "random": False,
            "healthy": True,
        }
        assert decision_of(proxy, "/fallback/x") == ("stable", answer["decision"])


def test_explain_refuses_a_bad_body_with_every_problem(proxy: ProxyProcess) -> None:
    status, answer = explain(
        proxy,
        "keyed",
        {
            "method": "GE T",
            "path": "no-slash",
            "headers": {"bad name": "x", "x-ok": 5},
            "client_ip": "300.1.1.1",
            "host": "x",
        },
    )
    assert status == 400
    assert answer["error"] == "invalid explain request"
    assert [detail.split(":")[0] for detail in answer["details"]] == [
        "host",
        "method",
        "path",
        "headers",
        "headers.x-ok",
        "client_ip",
    ]
    assert explain(proxy, "keyed", b"not json")[0] == 400
    assert explain(proxy, "keyed", ["GET"])[0] == 400
    status, answer = explain(proxy, "keyed", {"headers": {"host": "a b"}})
    assert (status, answer["error"]) == (400, "the data path would refuse this request with 400")
    assert explain(proxy, "nope", {})[0] == 404
    assert explain(proxy, "nope", b"not json")[0] == 404


def test_explain_reads_headers_as_the_data_path_does(proxy: ProxyProcess) -> None:
    # Repeated headers joined, names in any case, a header with an underscore dropped.
    status, answer = explain(
        proxy,
        "keyed",
        {"headers": {"Cookie": ["team=dev", "session=s5"], "X_User_Id": "alice"}},
    )
    assert status == 200
    assert (answer["version"], answer["decision"]) == (
        hash_version("s5", WEIGHTS, SALT),
        "split;key=cookie:session",
    )
    status, answer = explain(proxy, "keyed", {"method": "get", "headers": {"Cookie": "team=qa"}})
    assert answer["decision"] == "rule=1;name=qa-team"


# --------------------------------------------------------------------------- ctl explain


def test_ctl_explain_prints_the_version_and_why(proxy: ProxyProcess) -> None:
    def ctl(*args: str) -> str:
        result = run_cli("ctl", "--url", proxy.control_url, "explain", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    expected = hash_version("alice", WEIGHTS, SALT)
    assert ctl("keyed", "-H", "x-user-id: alice", "--path", "/keyed/x") == (
        f"version: {expected}\ndecision: split;key=header:x-user-id\n"
    )
    assert ctl("keyed", "--client-ip", "127.0.0.200", "--path", "/keyed/admin") == (
        "version: stable\ndecision: rule=2;name=office\n"
    )
    assert ctl("random") == (
        "version: drawn at random (stable 50%, canary 50%)\n"
        "decision: split;random\n"
        "note: no key in the request: the version comes from a draw at random by weight\n"
    )
    answer = json.loads(ctl("keyed", "-H", "Cookie: team=qa", "--method", "HEAD", "--json"))
    assert answer == {
        "version": "canary",
        "decision": "rule=1;name=qa-team",
        "random": False,
        "healthy": True,
    }
    refused = run_cli("ctl", "--url", proxy.control_url, "explain", "keyed", "--client-ip", "x")
    assert refused.returncode == 1
    assert "client_ip: expected an IPv4 or IPv6 address" in refused.stderr
    usage = run_cli("ctl", "--url", proxy.control_url, "explain", "keyed", "-H", "no-colon")
    assert usage.returncode == 2 and "expected 'NAME: VALUE'" in usage.stderr
