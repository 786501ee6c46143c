"""Configuration loading: example files, the documented example, every error and its line."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import loader
from proxy.config import (
    MAX_WEIGHT,
    Address,
    Config,
    ConfigError,
    FieldMatch,
    HashSource,
    HealthCheck,
    OutlierDetection,
    Retries,
    Service,
    StickyCookie,
    Timeouts,
    Version,
    check_weights,
    split_problem,
)
from proxy.loader import (
    MAX_CONFIG_BYTES,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    parse_match_host,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

EXAMPLE = """\
listen: "127.0.0.1:8080"            # data plane; host:port, [::1]:port
workers: 1                          # processes sharing the port (SO_REUSEPORT)
control:
  listen: "127.0.0.1:9901"          # control API, metrics, dashboard
  token_env: GRAYPROXY_TOKEN        # or token_file: /path; see §4
timeouts: {connect: 2s, response: 30s, idle: 60s}   # defaults; a service may override
limits: {max_header_bytes: 32768, header_read_timeout: 10s, max_body_bytes: 0}  # 0 = no limit
services:
  - name: web                       # [a-z0-9-]+, unique
    match: {host: "*", path_prefix: "/"}   # gateway: first matching service wins
    baseline: stable                # the version that rollback returns to (default: first)
    fallback: stable                # optional: where traffic goes when ...
    timeouts: {response: 5s}        # optional per-service override
    versions:
      stable: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
      canary: {endpoints: ["127.0.0.1:9101"]}
    split:
      weights: {stable: 90, canary: 10}   # ratios; resolution 0.01 %
      hash_on: [{header: x-user-id}, {cookie: session}]   # first present is the key
      sticky_cookie: {name: gp_sticky, max_age: 86400}    # optional, for keyless clients
      salt: "release-2026-11"       # changes every user's bucket when changed
    rules:                          # first match wins, before the split
      - match: {header: {name: x-canary, value: always}}
        version: canary
      - match: {header: {name: x-canary, value: never}}
        version: stable
      - match: {cookie: {name: canary, value: always}}
        version: canary
      - match: {header: {name: user-agent, regex: "(iPhone|Android)"}}
        version: canary
"""

# The smallest valid config: one service, one version.
MINIMAL = 'services: [{name: web, versions: {v1: {endpoints: ["127.0.0.1:9001"]}}}]'


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse(text)
    return refused.value.errors


def only_service(text: str) -> Service:
    (service,) = parse(text).services
    return service


# ------------------------------------------------------------------------ example files


# Examples that name files the user provides (certificates): checked where they are made,
# tls-gateway.yaml by tests/test_tls.py.
NEEDS_USER_FILES = frozenset({"tls-gateway.yaml"})


@pytest.mark.parametrize(
    "path",
    sorted(path for path in CONFIG_DIR.glob("*.yaml") if path.name not in NEEDS_USER_FILES),
    ids=lambda path: path.name,
)
def test_every_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAYPROXY_TOKEN", "example-token")  # gateway.yaml needs it
    monkeypatch.setenv("GRAYPROXY_READ_TOKEN", "example-read-token")  # team.yaml's read token
    config = load_config(str(path))
    assert config.services
    assert config.source == str(path)


def test_the_examples_cover_the_documented_set() -> None:
    names = {path.name for path in CONFIG_DIR.glob("*.yaml")}
    assert {"canary.yaml", "blue-green.yaml", "ab-testing.yaml", "gateway.yaml"} <= names


@pytest.mark.parametrize("name", ["canary.yaml", "blue-green.yaml", "ab-testing.yaml"])
def test_examples_other_than_gateway_need_no_token(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAYPROXY_TOKEN", raising=False)
    assert load_config(str(CONFIG_DIR / name)).control.token is None


def test_canary_example_is_the_documented_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAYPROXY_TOKEN", "t")
    assert load_config(str(CONFIG_DIR / "canary.yaml")).services == parse(EXAMPLE).services


def test_blue_green_example_previews_the_idle_version() -> None:
    (service,) = load_config(str(CONFIG_DIR / "blue-green.yaml")).services
    assert service.split.weights == {"blue": 100.0, "green": 0.0}
    assert service.baseline == "blue"
    assert service.rules[0].version == "green"
    assert service.rules[0].headers == (FieldMatch("x-preview", value="green"),)


def test_gateway_example_needs_its_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAYPROXY_TOKEN", raising=False)
    path = CONFIG_DIR / "gateway.yaml"
    line = path.read_text().splitlines().index("  token_env: GRAYPROXY_TOKEN") + 1
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert refused.value.errors == [
        f"control.token_env: line {line}: environment variable GRAYPROXY_TOKEN is not set"
    ]


# ------------------------------------------------------------------ the documented example


def test_spec_example_loads_into_the_right_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAYPROXY_TOKEN", "  s3cret\n")
    config = parse(EXAMPLE)
    assert config.listen == Address("127.0.0.1", 8080)
    assert config.workers == 1
    assert config.control.listen == Address("127.0.0.1", 9901)
    assert config.control.token == "s3cret"
    assert config.control.token_env == "GRAYPROXY_TOKEN"
    assert config.timeouts == Timeouts(connect=2.0, response=30.0, idle=60.0)
    assert config.limits.max_header_bytes == 32768
    assert config.limits.header_read_timeout == 10.0
    assert config.limits.max_body_bytes == 0
    assert config.drain_timeout == 30.0

    (web,) = config.services
    assert web.name == "web"
    assert (web.match.host, web.match.path_prefix) == ("*", "/")
    assert (web.baseline, web.fallback) == ("stable", "stable")
    assert web.timeouts == Timeouts(connect=2.0, response=5.0, idle=60.0)
    assert web.versions == (
        Version("stable", (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))),
        Version("canary", (Address("127.0.0.1", 9101),)),
    )
    assert list(web.split.weights.items()) == [("stable", 90.0), ("canary", 10.0)]
    assert web.split.hash_on == (HashSource("header", "x-user-id"), HashSource("cookie", "session"))
    assert web.split.sticky_cookie == StickyCookie("gp_sticky", 86400)
    assert web.split.salt == "release-2026-11"
    assert web.version_header is True

    assert [rule.version for rule in web.rules] == ["canary", "stable", "canary", "canary"]
    assert web.rules[0].headers == (FieldMatch("x-canary", value="always"),)
    assert web.rules[2].cookies == (FieldMatch("canary", value="always"),)
    user_agent = web.rules[3].headers[0]
    assert user_agent.name == "user-agent"
    assert user_agent.regex is not None and user_agent.regex.search("Mozilla (iPhone; ...)")


# ------------------------------------------------------------------------ defaults


def test_defaults_of_a_minimal_config() -> None:
    config = parse(MINIMAL)
    assert config.listen == Address("127.0.0.1", 8080)
    assert config.control.listen == Address("127.0.0.1", 9901)
    assert config.control.token is None
    assert config.workers == 1
    assert config.drain_timeout == 30.0
    assert config.headers_with_underscores == "drop"
    (web,) = config.services
    assert web.baseline == "v1"
    assert web.fallback is None
    assert web.split.weights == {"v1": 100.0}
    assert web.split.hash_on == ()
    assert web.split.sticky_cookie is None
    assert web.rules == ()
    assert web.version_header is True
    assert (web.match.host, web.match.path_prefix) == ("*", "/")
    assert web.timeouts == Timeouts()


def test_without_weights_the_first_version_gets_everything() -> None:
    web = only_service("""
        services:
          - name: web
            versions:
              b: {endpoints: ["h:1"]}
              a: {endpoints: ["h:2"]}
            split: {hash_on: [{client_ip: true}]}
        """)
    assert list(web.split.weights.items()) == [("b", 100.0), ("a", 0.0)]
    assert web.baseline == "b"
    assert web.split.hash_on == (HashSource("client_ip"),)


def test_versions_left_out_of_weights_get_zero_in_version_order() -> None:
    web = only_service("""
        services:
          - name: web
            versions: {x: {endpoints: ["h:1"]}, y: {endpoints: ["h:2"]}, z: {endpoints: ["h:3"]}}
            split: {weights: {z: 2.5, x: 0.01}}
        """)
    assert list(web.split.weights.items()) == [("x", 0.01), ("y", 0.0), ("z", 2.5)]
    assert all(isinstance(weight, float) for weight in web.split.weights.values())


def test_service_timeouts_override_the_global_ones_key_by_key() -> None:
    config = parse("""
        timeouts: {connect: 500ms, idle: 2m}
        services:
          - name: web
            timeouts: {response: 1.5s}
            versions: {v1: {endpoints: ["h:1"]}}
        """)
    assert config.timeouts == Timeouts(connect=0.5, response=30.0, idle=120.0)
    assert config.services[0].timeouts == Timeouts(connect=0.5, response=1.5, idle=120.0)


def test_null_or_empty_sections_count_as_absent() -> None:
    web = only_service("""
        control:
        services:
          - name: web
            rules:
            split:
            versions: {v1: {endpoints: ["h:1"]}}
        """)
    assert web.rules == ()
    assert web.split.weights == {"v1": 100.0}


def test_rule_conditions_in_every_form() -> None:
    web = only_service("""
        services:
          - name: web
            versions: {stable: {endpoints: ["h:1"]}, beta: {endpoints: ["h:2"]}}
            split: {weights: {stable: 100}}
            rules:
              - match:
                  header:
                    - {name: X-Beta, present: true}
                    - {name: X-Team, regex: "^(qa|dev)$"}
                  cookie: {name: Beta, value: "1"}
                  query: [{name: preview, value: "010"}]
                  path_prefix: /api/
                  method: [get, Post]
                  source: ["10.1.2.3/8", "::1"]
                version: beta
              - match: {method: delete}
                version: beta
              - match: {}
                version: stable
              - version: stable
        """)
    first, second, third, fourth = web.rules
    assert first.version == "beta"
    assert first.headers[0] == FieldMatch("x-beta", present=True)
    assert first.headers[1].name == "x-team"
    assert first.headers[1].regex == re.compile("^(qa|dev)$")
    assert first.cookies == (FieldMatch("Beta", value="1"),)
    assert first.query == (FieldMatch("preview", value="010"),)  # the text as written
    assert first.path_prefix == "/api/"
    assert first.methods == frozenset({"GET", "POST"})
    assert first.sources == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert second.methods == frozenset({"DELETE"})
    for match_all in (third, fourth):
        assert (match_all.headers, match_all.cookies, match_all.query) == ((), (), ())
        assert match_all.path_prefix is None
        assert (match_all.methods, match_all.sources) == (frozenset(), ())


def test_match_host_is_lower_cased() -> None:
    web = only_service("""
        services:
          - name: web
            match: {host: "*.Example.COM", path_prefix: /shop}
            versions: {v1: {endpoints: ["h:1"]}}
        """)
    assert (web.match.host, web.match.path_prefix) == ("*.example.com", "/shop")


def test_listen_addresses_accept_ipv6_and_port_zero() -> None:
    config = parse("""
        listen: "[::1]:0"
        control: {listen: "localhost:0"}
        services: [{name: web, versions: {v1: {endpoints: ["[::1]:9001", "backend.local:80"]}}}]
        """)
    assert config.listen == Address("::1", 0)
    assert str(config.listen) == "[::1]:0"
    assert config.control.listen == Address("localhost", 0)
    assert config.services[0].versions[0].endpoints == (
        Address("::1", 9001),
        Address("backend.local", 80),
    )


def test_yaml_aliases_can_share_values() -> None:
    config = parse("""
        services:
          - name: a
            versions: {v1: {endpoints: &pool ["h:1", "h:2"]}}
          - name: b
            versions: {v1: {endpoints: *pool}}
        """)
    assert config.services[0].versions == config.services[1].versions


# ------------------------------------------------------------------------ control token


def test_token_from_a_file_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  abc123 \n")
    config = parse(f"""
        control: {{listen: "0.0.0.0:9901", token_file: "{tmp_path / "token"}"}}
        {MINIMAL}
        """)
    assert config.control.token == "abc123"
    assert config.control.token_file == str(tmp_path / "token")


def test_relative_token_file_is_read_next_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    (tmp_path / "grayproxy.yaml").write_text(f"control: {{token_file: secret}}\n{MINIMAL}\n")
    assert load_config(str(tmp_path / "grayproxy.yaml")).control.token == "from-file"


def test_non_loopback_control_with_a_token_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GP_TEST_TOKEN", "t0k3n")
    config = parse(f"""
        control: {{listen: "0.0.0.0:9901", token_env: GP_TEST_TOKEN}}
        {MINIMAL}
        """)
    assert config.control.token == "t0k3n"


@pytest.mark.parametrize(
    ("control", "expected"),
    [
        (
            '{listen: "0.0.0.0:9901"}',
            "control.listen: line 1: a non-loopback control listener needs control.token_env",
        ),
        (
            '{listen: "[::]:9901"}',
            "control.listen: line 1: a non-loopback control listener needs control.token_env",
        ),
        ("{token_env: GP_TEST_TOKEN}", "control.token_env: line 1: environment variable"),
        (
            "{token_env: GP_TEST_EMPTY}",
            "control.token_env: line 1: environment variable GP_TEST_EMPTY is empty",
        ),
        (
            "{token_env: GP_TEST_SPACE}",
            "control.token_env: line 1: environment variable GP_TEST_SPACE: the token must be",
        ),
        ("{token_file: /nonexistent/token}", "control.token_file: line 1: cannot read"),
        ("{token_env: A, token_file: B}", "control: line 1: set token_env or token_file"),
        ('{listen: "127.0.0.1:8080"}', "control.listen: line 1: 127.0.0.1:8080 is also"),
    ],
)
def test_control_errors(control: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GP_TEST_TOKEN", raising=False)
    monkeypatch.setenv("GP_TEST_EMPTY", "  ")
    monkeypatch.setenv("GP_TEST_SPACE", "two words")
    (error,) = errors_of(f"control: {control}\n{MINIMAL}")
    assert error.startswith(expected)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n \n")
    (error,) = errors_of(f'control: {{token_file: "{tmp_path / "token"}"}}\n{MINIMAL}')
    assert error == f"control.token_file: line 1: token file {tmp_path / 'token'} is empty"


# ------------------------------------------------------------------------ every error kind

SERVICE = "services:\n  - name: web\n"
ONE_VERSION = "    versions: {v1: {endpoints: [h:1]}}\n"
TWO_VERSIONS = "    versions: {stable: {endpoints: [h:1]}, canary: {endpoints: [h:2]}}\n"
SPLIT = SERVICE + TWO_VERSIONS + "    split:\n"  # split keys go on line 5
RULES = SERVICE + TWO_VERSIONS + "    rules:\n"  # the first rule starts on line 5

# (config, yaml path, line, part of the message)
# fmt: off
ERROR_CASES = [
    ("bogus: 1\n" + MINIMAL, "bogus", 1, "unknown key 'bogus'"),
    (SERVICE + ONE_VERSION + "    colour: red", "services[0].colour", 4, "unknown key 'colour'"),
    ("workers: two\n" + MINIMAL, "workers", 1, "expected an integer, got a string"),
    ("workers: 0\n" + MINIMAL, "workers", 1, "must be at least 1"),
    ("listen: 8080\n" + MINIMAL, "listen", 1, "expected host:port"),
    ("listen: ['127.0.0.1:80']\n" + MINIMAL, "listen", 1, 'expected "host:port", got a list'),
    ("listen: http://localhost:80\n" + MINIMAL, "listen", 1, "without a scheme"),
    ("listen: localhost:80/x\n" + MINIMAL, "listen", 1, "without a path"),
    ("listen: '::1:80'\n" + MINIMAL, "listen", 1, "IPv6 addresses go in brackets"),
    ("listen: '[::zz]:80'\n" + MINIMAL, "listen", 1, "is not an IPv6 address"),
    ("listen: 'bad_host!:80'\n" + MINIMAL, "listen", 1, "not a valid host name"),
    ("listen: '300.1.1.1:80'\n" + MINIMAL, "listen", 1, "not a valid host name"),
    ("listen: ':80'\n" + MINIMAL, "listen", 1, "the host is missing"),
    ("listen: 'h:99999'\n" + MINIMAL, "listen", 1, "between 0 and 65535"),
    ("listen: 'h:http'\n" + MINIMAL, "listen", 1, "the port must be a number"),
    ("timeouts: {connect: 0}\n" + MINIMAL, "timeouts.connect", 1, "must be greater than zero"),
    ("timeouts: {idle: -1}\n" + MINIMAL, "timeouts.idle", 1, "must not be negative"),
    ("timeouts: {idle: .inf}\n" + MINIMAL, "timeouts.idle", 1, "must be a finite number"),
    ("timeouts: {response: 5 s}\n" + MINIMAL, "timeouts.response", 1, "invalid duration"),
    ("timeouts: {response: true}\n" + MINIMAL, "timeouts.response", 1, "expected a duration"),
    ("timeouts: 5s\n" + MINIMAL, "timeouts", 1, "expected a mapping, got a string"),
    ("limits: {max_body_bytes: -1}\n" + MINIMAL, "limits.max_body_bytes", 1, "at least 0"),
    ("limits: {max_header_bytes: 1.5}\n" + MINIMAL, "limits.max_header_bytes", 1,
     "expected an integer, got a number"),
    ("limits: {header_read_timeout: 0s}\n" + MINIMAL, "limits.header_read_timeout", 1,
     "greater than zero"),
    ("drain_timeout: soon\n" + MINIMAL, "drain_timeout", 1, "invalid duration"),
    ("listen: '127.0.0.1:1'", "services", 1, "required"),
    ("services: {web: 1}", "services", 1, "expected a list, got a mapping"),
    ("services: [web]", "services[0]", 1, "expected a mapping, got a string"),
    ("services:\n  - versions: {v1: {endpoints: [h:1]}}", "services[0].name", 2, "required"),
    ("services:\n  - name: Web_1\n" + ONE_VERSION, "services[0].name", 2,
     "may only contain a-z, 0-9 and '-'"),
    (SERVICE, "services[0].versions", 2, "required"),
    (SERVICE + "    versions: {}", "services[0].versions", 3, "at least one version"),
    (SERVICE + "    versions: [v1]", "services[0].versions", 3, "expected a mapping, got a list"),
    (SERVICE + "    versions:\n      v 1: {endpoints: [h:1]}", "services[0].versions.v 1", 4,
     "version names may only contain"),
    (SERVICE + "    versions:\n      v1: {endpoints: []}", "services[0].versions.v1.endpoints", 4,
     "at least one endpoint"),
    (SERVICE + "    versions:\n      v1: {}", "services[0].versions.v1.endpoints", 4, "required"),
    (SERVICE + "    versions:\n      v1: {endpoints: [h:1, h:1]}",
     "services[0].versions.v1.endpoints[1]", 4, "duplicate endpoint h:1"),
    (SERVICE + "    versions:\n      v1:\n        endpoints:\n          - h:0",
     "services[0].versions.v1.endpoints[0]", 6, "between 1 and 65535"),
    (SERVICE + "    versions:\n      v1: {endpoints: [h:1], weight: 3}",
     "services[0].versions.v1.weight", 4, "unknown key 'weight'"),
    (SERVICE + "    match: {host: 'a.com:80'}\n" + ONE_VERSION, "services[0].match.host", 3,
     "must not contain a port"),
    (SERVICE + "    match: {host: 'a.*.com'}\n" + ONE_VERSION, "services[0].match.host", 3,
     'expected "*", a host name'),
    (SERVICE + "    match: {path_prefix: api}\n" + ONE_VERSION, "services[0].match.path_prefix", 3,
     "must start with '/'"),
    (SERVICE + "    baseline: v2\n" + ONE_VERSION, "services[0].baseline", 3,
     "unknown version 'v2' (versions: v1)"),
    (SERVICE + "    fallback: v2\n" + ONE_VERSION, "services[0].fallback", 3,
     "unknown version 'v2'"),
    (SERVICE + "    fallback: v1\n" + ONE_VERSION, "services[0].fallback", 3,
     "the only version cannot be its own fallback"),
    (SERVICE + "    version_header: 1\n" + ONE_VERSION, "services[0].version_header", 3,
     "expected true or false, got an integer"),
    (SPLIT + "      weights: {stable: 90, canary: -10}", "services[0].split.weights.canary", 5,
     "must not be negative"),
    (SPLIT + "      weights: {stable: 0, canary: 0}", "services[0].split.weights", 5,
     "at least one weight must be above zero"),
    (SPLIT + "      weights: {}", "services[0].split.weights", 5, "at least one weight"),
    (SPLIT + "      weights: {stable: 90, beta: 10}", "services[0].split.weights.beta", 5,
     "unknown version 'beta' (versions: stable, canary)"),
    (SPLIT + "      weights: {stable: 99.995, canary: 0.005}",
     "services[0].split.weights.stable", 5, "must be a multiple of 0.01"),
    (SPLIT + "      weights: {stable: 1000000.01, canary: 1}", "services[0].split.weights.stable",
     5, "must be at most 1000000"),
    (SPLIT + "      weights: {stable: 1.0e+35, canary: 1}", "services[0].split.weights.stable", 5,
     "must be at most 1000000"),
    (SPLIT + f"      weights: {{stable: 1{'0' * 400}, canary: 1}}",
     "services[0].split.weights.stable", 5, "must be a finite number"),
    (SPLIT + f"      weights: {{stable: {'9' * 5000}, canary: 1}}",
     "services[0].split.weights.stable", 5, "too many digits"),
    (f"workers: {'9' * 5000}\n" + MINIMAL, "workers", 1, "too many digits"),
    ("headers_with_underscores: strip\n" + MINIMAL, "headers_with_underscores", 1,
     "'strip': expected one of: drop, reject, allow"),
    ("headers_with_underscores: [drop]\n" + MINIMAL, "headers_with_underscores", 1,
     "expected a string, got a list"),
    (SPLIT + "      weights: {stable: '90', canary: 10}", "services[0].split.weights.stable", 5,
     "expected a number, got a string"),
    (SPLIT + "      weights: {stable: yes}", "services[0].split.weights.stable", 5,
     "expected a number, got a boolean"),
    (SPLIT + "      weights: [90, 10]", "services[0].split.weights", 5,
     "expected a mapping, got a list"),
    (SPLIT + "      hash_on: [{header: a, cookie: b}]", "services[0].split.hash_on[0]", 5,
     "exactly one of: header, cookie, query, client_ip"),
    (SPLIT + "      hash_on: [{ip: true}]", "services[0].split.hash_on[0].ip", 5,
     "unknown key 'ip'"),
    (SPLIT + "      hash_on: [{client_ip: false}]", "services[0].split.hash_on[0].client_ip", 5,
     "must be true"),
    (SPLIT + "      hash_on: [{header: 'x user'}]", "services[0].split.hash_on[0].header", 5,
     "not a valid header name"),
    (SPLIT + "      sticky_cookie: {max_age: 60}", "services[0].split.sticky_cookie.name", 5,
     "required"),
    (SPLIT + "      sticky_cookie: {name: s, max_age: 0}",
     "services[0].split.sticky_cookie.max_age", 5, "must be greater than zero"),
    (SPLIT + "      sticky_cookie: {name: s, max_age: 1500ms}",
     "services[0].split.sticky_cookie.max_age", 5, "whole number of seconds"),
    (SPLIT + "      salt: [a]", "services[0].split.salt", 5, "expected a string, got a list"),
    (RULES + "      - match: {header: {name: x-a, value: b}}\n        version: beta",
     "services[0].rules[0].version", 6, "unknown version 'beta'"),
    (RULES + "      - match: {header: {name: x-a, value: b}}",
     "services[0].rules[0].version", 5, "required"),
    (RULES + "      - match: {header: {name: x-a, regex: '(unclosed'}}\n        version: canary",
     "services[0].rules[0].match.header.regex", 5, "invalid regular expression"),
    (RULES + "      - match: {header: {name: x-a}}\n        version: canary",
     "services[0].rules[0].match.header", 5, "exactly one of: value, regex, present"),
    (RULES + "      - match: {header: {name: x-a, value: a, regex: b}}\n        version: canary",
     "services[0].rules[0].match.header", 5, "exactly one of: value, regex, present"),
    (RULES + "      - match: {cookie: {value: a}}\n        version: canary",
     "services[0].rules[0].match.cookie.name", 5, "required"),
    (RULES + "      - match: {query: [{name: a, present: false}]}\n        version: canary",
     "services[0].rules[0].match.query[0].present", 5, "must be true"),
    (RULES + "      - match: {path_prefix: api}\n        version: canary",
     "services[0].rules[0].match.path_prefix", 5, "must start with '/'"),
    (RULES + "      - match: {method: [GET, 'NOT A METHOD']}\n        version: canary",
     "services[0].rules[0].match.method[1]", 5, "not an HTTP method"),
    (RULES + "      - match: {source: 10.0.0.0/33}\n        version: canary",
     "services[0].rules[0].match.source", 5, "not an IP network"),
    (RULES + "      - match: {hedaer: {name: a, value: b}}\n        version: canary",
     "services[0].rules[0].match.hedaer", 5, "unknown key 'hedaer'"),
    (RULES + "      - match: [x]\n        version: canary",
     "services[0].rules[0].match", 5, "expected a mapping, got a list"),
    (RULES + "      match: {}", "services[0].rules", 5, "expected a list, got a mapping"),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "path", "line", "message"),
    ERROR_CASES,
    ids=[f"{index}-{case[1]}" for index, case in enumerate(ERROR_CASES)],
)
def test_each_error_names_its_path_and_line(text: str, path: str, line: int, message: str) -> None:
    errors = errors_of(text)
    prefix = f"{path}: line {line}: "
    assert any(error.startswith(prefix) and message in error for error in errors), errors


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    (error,) = errors_of("""\
        services:
          - name: web
            versions: {v1: {endpoints: ["h:1"]}}
            name: api
        """)
    assert error == "services[0].name: line 4: duplicate key (first at line 2)"


def test_duplicate_service_names_are_refused() -> None:
    (error,) = errors_of("""\
        services:
          - name: web
            versions: {v1: {endpoints: ["h:1"]}}
          - name: web
            versions: {v1: {endpoints: ["h:2"]}}
        """)
    assert error == "services[1].name: line 4: duplicate service name 'web' (first at line 2)"


def test_merge_keys_are_refused_clearly() -> None:
    errors = errors_of("""\
        services:
          - name: web
            <<: {baseline: v1}
            versions: {v1: {endpoints: ["h:1"]}}
        """)
    assert errors == [
        "services[0]: line 3: merge keys (<<) are not supported; alias the whole value"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "services: [",
            "<string>: line 1: invalid YAML: while parsing a flow node at line 1, "
            "expected the node content",
        ),
        ("a: b\n  c: d\n", "<string>: line 2: invalid YAML: mapping values are not allowed here"),
        (
            "a: 1\n---\nb: 2\n",
            "<string>: line 2: invalid YAML: expected a single document in the stream "
            "at line 1, but found another document",
        ),
        ("a: \x07\n", "<string>: line 1: invalid YAML: special characters are not allowed"),
        ("", "<string>: line 1: the configuration is empty"),
        ("# only a comment\n", "<string>: line 1: the configuration is empty"),
        ("- a\n- b\n", "<string>: line 1: expected a mapping at the top, got a list"),
        ("services: []", "services: line 1: at least one service is required"),
        ("? [a]\n: 1\n" + MINIMAL, "line 1: keys must be strings, got a list"),
    ],
)
def test_document_level_errors(text: str, expected: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith(expected) or expected in error


def test_syntax_errors_name_the_file() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config("x: [", source="conf/web.yaml")
    assert refused.value.errors[0].startswith("conf/web.yaml: line 1: invalid YAML")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(str(tmp_path / "missing.yaml"))
    assert refused.value.errors == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    ]


@pytest.mark.parametrize("action", ["drop", "reject", "allow"])
def test_headers_with_underscores_takes_each_action(action: str) -> None:
    config = parse(f"headers_with_underscores: {action}\n{MINIMAL}")
    assert config.headers_with_underscores == action


def test_weights_up_to_the_maximum_are_exact() -> None:
    (service,) = parse(SPLIT + f"      weights: {{stable: {MAX_WEIGHT}, canary: 0.01}}").services
    assert service.split.weights == {"stable": 1_000_000.0, "canary": 0.01}
    assert MAX_WEIGHT == 1_000_000


# ------------------------------------------------------------------------ file size cap


def test_a_file_at_the_size_cap_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "grayproxy.yaml"
    path.write_text(MINIMAL + "\n")
    monkeypatch.setattr(loader, "MAX_CONFIG_BYTES", path.stat().st_size)
    assert load_config(str(path)).services[0].name == "web"


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "grayproxy.yaml"
    with path.open("wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)  # sparse: nothing to parse, only too large
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert refused.value.errors == [
        f"{path}: too large: {MAX_CONFIG_BYTES + 1} bytes; "
        f"the limit is {MAX_CONFIG_BYTES} bytes (8 MiB)"
    ]


def test_a_file_that_grows_past_the_cap_while_read_is_refused(tmp_path: Path) -> None:
    # A pipe has no size to check beforehand: only the bounded read can catch it, as it
    # catches a file that grows between the size check and the read.
    path = tmp_path / "grayproxy.yaml"
    os.mkfifo(path)

    def write() -> None:
        with contextlib.suppress(BrokenPipeError):  # the reader stops at the limit
            path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 10))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        with pytest.raises(ConfigError) as refused:
            load_config(str(path))
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # never leave the writer blocked
        writer.join(10)
    assert refused.value.errors == [
        f"{path}: too large: more than {MAX_CONFIG_BYTES} bytes read; "
        f"the limit is {MAX_CONFIG_BYTES} bytes (8 MiB)"
    ]


def test_every_error_is_reported_at_once_in_line_order() -> None:
    errors = errors_of("""\
        listen: "localhost"
        workers: 0
        timeouts: {connect: fast}
        services:
          - name: Web
            versions:
              stable: {endpoints: ["127.0.0.1:9001"]}
              canary: {endpoints: ["127.0.0.1:0"]}
            split:
              weights: {stable: 90, canary: -10, ghost: 5}
              hash_on: [{header: x-user-id}, {cookie: ""}]
            rules:
              - match: {header: {name: x-canary, regex: "("}}
                version: beta
          - name: api
            versions: {}
        """)
    assert errors == [
        "listen: line 1: 'localhost': expected host:port",
        "workers: line 2: must be at least 1",
        "timeouts.connect: line 3: invalid duration 'fast': expected e.g. 250ms, 5s, 2m, 1h, 7d "
        "or a number of seconds",
        "services[0].name: line 5: 'Web': service names may only contain a-z, 0-9 and '-'",
        "services[0].versions.canary.endpoints[0]: line 8: '127.0.0.1:0': the port must be "
        "between 1 and 65535",
        "services[0].split.weights.canary: line 10: must not be negative",
        "services[0].split.weights.ghost: line 10: unknown version 'ghost' (versions: stable, "
        "canary)",
        "services[0].split.hash_on[1].cookie: line 11: must not be empty",
        "services[0].rules[0].match.header.regex: line 13: invalid regular expression: missing ), "
        "unterminated subpattern at position 0",
        "services[0].rules[0].version: line 14: unknown version 'beta' (versions: stable, canary)",
        "services[1].versions: line 16: at least one version is required",
    ]


def test_config_error_message_lists_every_error() -> None:
    with pytest.raises(ConfigError) as refused:
        parse("workers: 0\nbogus: 1\n" + MINIMAL)
    assert str(refused.value) == "\n".join(refused.value.errors)
    assert len(refused.value.errors) == 2


# ------------------------------------------------------------------------ durations, addresses


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("0", 0.0),
        ("2.5", 2.5),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-1s", "5 s", "5sec", "1e3", "5S", ".5s", "\u0663s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@given(
    amount=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
)
def test_duration_round_trip(amount: int, unit: tuple[str, float]) -> None:
    suffix, scale = unit
    assert parse_duration(f"{amount}{suffix}") == pytest.approx(amount * scale)
    config = parse(f"drain_timeout: {amount}{suffix}\n{MINIMAL}")
    assert config.drain_timeout == pytest.approx(amount * scale)


@given(seconds=st.floats(min_value=0.001, max_value=10**6, allow_nan=False, allow_infinity=False))
def test_bare_numbers_are_seconds(seconds: float) -> None:
    assert parse(f"timeouts: {{idle: {seconds!r}}}\n{MINIMAL}").timeouts.idle == seconds


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("[::1]:9001", Address("::1", 9001)),
        ("[2001:db8::1]:443", Address("2001:db8::1", 443)),
        ("localhost:80", Address("localhost", 80)),
        ("api.internal.example.com:65535", Address("api.internal.example.com", 65535)),
        ("my_service:8080", Address("my_service", 8080)),
    ],
)
def test_addresses_parse(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    [
        "8080",
        "host",
        "host:",
        ":80",
        "host:0",
        "host:65536",
        "::1:80",
        "[::1]",
        "[::1]80",
        "http://host:80",
        "host:80/path",
        "-bad-:80",
        "a..b:80",
        "1.2.3.256:80",
        "host:+80",
    ],
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_port_zero_only_when_ephemeral_is_allowed() -> None:
    assert parse_address("127.0.0.1:0", allow_ephemeral=True) == Address("127.0.0.1", 0)
    with pytest.raises(ValueError, match="between 1 and 65535"):
        parse_address("127.0.0.1:0")


@given(
    host=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_address_round_trip(host: str, port: int) -> None:
    address = Address(host, port)
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", "*"),
        ("Example.COM", "example.com"),
        ("*.example.com", "*.example.com"),
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]", "[::1]"),
    ],
)
def test_match_hosts(text: str, expected: str) -> None:
    assert parse_match_host(text) == expected


@pytest.mark.parametrize("text", ["example.com:80", "[::1]:80", "*example.com", "a.*.com", "**"])
def test_bad_match_hosts(text: str) -> None:
    with pytest.raises(ValueError):
        parse_match_host(text)


# ------------------------------------------------------------------------ check_weights

WEB = only_service("""
    services:
      - name: web
        versions:
          stable: {endpoints: ["h:1"]}
          canary: {endpoints: ["h:2"]}
          dark: {endpoints: ["h:3"]}
    """)


RATIO_HINT = "(weights are ratios: 9 and 1 split like 90 and 10)"


@pytest.mark.parametrize("weights", [{"stable": 0, "canary": 0}, {"stable": 0}, {}])
def test_the_file_and_a_runtime_change_refuse_all_zero_weights_alike(
    weights: dict[str, int],
) -> None:
    problem = split_problem(weights)
    assert problem == "at least one weight must be above zero"
    with pytest.raises(ConfigError) as at_runtime:
        check_weights(WEB, weights)
    assert at_runtime.value.errors == [f"weights: {problem}"]
    in_yaml = "{" + ", ".join(f"{name}: {weight}" for name, weight in weights.items()) + "}"
    with pytest.raises(ConfigError) as in_the_file:
        parse_config(SPLIT + f"      weights: {in_yaml}")
    assert in_the_file.value.errors == [f"services[0].split.weights: line 5: {problem}"]


def test_one_weight_above_zero_is_enough() -> None:
    assert split_problem({"stable": 0.0, "canary": 0.01}) is None


def test_check_weights_completes_and_orders() -> None:
    weights = check_weights(WEB, {"canary": 20, "stable": 80.5})
    assert list(weights.items()) == [("stable", 80.5), ("canary", 20.0), ("dark", 0.0)]
    assert all(type(weight) is float for weight in weights.values())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"canary": -1, "stable": 1}, ["weights.canary: must not be negative"]),
        ({"stable": 0, "canary": 0}, ["weights: at least one weight must be above zero"]),
        ({}, ["weights: at least one weight must be above zero"]),
        ({"beta": 10}, ["weights.beta: unknown version 'beta' (versions: stable, canary, dark)"]),
        ({"stable": "90"}, ["weights.stable: expected a number"]),
        ({"stable": True}, ["weights.stable: expected a number"]),
        ({"stable": None}, ["weights.stable: expected a number"]),
        ({"stable": 0.001}, ["weights.stable: must be a multiple of 0.01 (the split resolution)"]),
        ({"stable": float("inf")}, ["weights.stable: must be a finite number"]),
        ({"stable": float("nan")}, ["weights.stable: must be a finite number"]),
        ({"stable": 1e35}, [f"weights.stable: must be at most {MAX_WEIGHT} {RATIO_HINT}"]),
        ({"stable": 10**400}, [f"weights.stable: must be at most {MAX_WEIGHT} {RATIO_HINT}"]),
        ({"stable": 1_000_000.01}, [f"weights.stable: must be at most {MAX_WEIGHT} {RATIO_HINT}"]),
        ({"stable": -(10**400)}, ["weights.stable: must not be negative"]),
        ([90, 10], ["weights: expected a mapping of version name to weight"]),
        (
            {"stable": -1, "beta": 1},
            [
                "weights.stable: must not be negative",
                "weights.beta: unknown version 'beta' (versions: stable, canary, dark)",
            ],
        ),
    ],
)
def test_check_weights_refuses(raw: object, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        check_weights(WEB, raw)
    assert refused.value.errors == expected


@given(
    cents=st.dictionaries(
        st.sampled_from(["stable", "canary", "dark"]), st.integers(0, MAX_WEIGHT * 100), min_size=1
    ).filter(lambda weights: any(weights.values()))
)
def test_check_weights_accepts_any_hundredths(cents: dict[str, int]) -> None:
    raw = {name: value / 100 for name, value in cents.items()}
    weights = check_weights(WEB, raw)
    assert list(weights) == ["stable", "canary", "dark"]
    assert weights == {name: raw.get(name, 0.0) for name in weights}


# ------------------------------------------------------------ health, balancing, retries


def test_health_balancing_and_retry_defaults() -> None:
    web = only_service(MINIMAL)
    assert web.load_balancing == "round_robin"
    assert web.max_connections_per_endpoint == 0
    assert web.health_check is None
    assert web.outlier_detection == OutlierDetection(
        consecutive_5xx=5,
        consecutive_connect_failures=1,
        base_ejection_time=10.0,
        max_ejection_time=300.0,
        max_ejection_percent=50,
    )
    assert web.retries == Retries(attempts=2)


def test_health_balancing_and_retry_keys() -> None:
    web = only_service("""
        services:
          - name: web
            load_balancing: least_request
            max_connections_per_endpoint: 64
            health_check:
              path: /ready?deep=1
              host: app.internal
              interval: 2s
              timeout: 250ms
              healthy_threshold: 1
              unhealthy_threshold: 4
            outlier_detection:
              consecutive_5xx: 0
              consecutive_connect_failures: 3
              base_ejection_time: 30s
              max_ejection_time: 10m
              max_ejection_percent: 100
            retries: {attempts: 0}
            versions: {v1: {endpoints: ["127.0.0.1:9001"]}}
    """)
    assert web.load_balancing == "least_request"
    assert web.max_connections_per_endpoint == 64
    assert web.health_check == HealthCheck(
        path="/ready?deep=1",
        host="app.internal",
        interval=2.0,
        timeout=0.25,
        healthy_threshold=1,
        unhealthy_threshold=4,
    )
    assert web.outlier_detection == OutlierDetection(0, 3, 30.0, 600.0, 100)
    assert web.retries == Retries(attempts=0)


def test_an_empty_health_check_block_checks_with_the_defaults() -> None:
    web = only_service("""
        services:
          - name: web
            health_check: {}
            outlier_detection: {max_ejection_percent: 10}
            versions: {v1: {endpoints: ["127.0.0.1:9001"]}}
    """)
    assert web.health_check == HealthCheck(path="/healthz", interval=5.0, timeout=1.0)
    assert web.outlier_detection == OutlierDetection(max_ejection_percent=10)


HEALTH = SERVICE + ONE_VERSION  # health keys go on line 4

# fmt: off
HEALTH_ERROR_CASES = [
    (HEALTH + "    load_balancing: random", "services[0].load_balancing", 4,
     "'random': expected one of: round_robin, least_request"),
    (HEALTH + "    max_connections_per_endpoint: -1", "services[0].max_connections_per_endpoint",
     4, "must be at least 0"),
    (HEALTH + "    health_check: /healthz", "services[0].health_check", 4,
     "expected a mapping, got a string"),
    (HEALTH + "    health_check: {path: healthz}", "services[0].health_check.path", 4,
     "must start with '/'"),
    (HEALTH + "    health_check: {path: '/a b'}", "services[0].health_check.path", 4,
     "without spaces or '#'"),
    (HEALTH + "    health_check: {host: 'a b'}", "services[0].health_check.host", 4,
     "not a valid Host"),
    (HEALTH + "    health_check: {interval: 0s}", "services[0].health_check.interval", 4,
     "must be greater than zero"),
    (HEALTH + "    health_check: {timeout: soon}", "services[0].health_check.timeout", 4,
     "invalid duration"),
    (HEALTH + "    health_check: {healthy_threshold: 0}",
     "services[0].health_check.healthy_threshold", 4, "must be at least 1"),
    (HEALTH + "    health_check: {unhealthy_threshold: 1.5}",
     "services[0].health_check.unhealthy_threshold", 4, "expected an integer"),
    (HEALTH + "    health_check: {port: 80}", "services[0].health_check.port", 4,
     "unknown key 'port'"),
    (HEALTH + "    outlier_detection: {consecutive_5xx: -1}",
     "services[0].outlier_detection.consecutive_5xx", 4, "must be at least 0"),
    (HEALTH + "    outlier_detection: {consecutive_connect_failures: x}",
     "services[0].outlier_detection.consecutive_connect_failures", 4, "expected an integer"),
    (HEALTH + "    outlier_detection: {base_ejection_time: 0}",
     "services[0].outlier_detection.base_ejection_time", 4, "must be greater than zero"),
    (HEALTH + "    outlier_detection: {max_ejection_time: -5s}",
     "services[0].outlier_detection.max_ejection_time", 4, "invalid duration"),
    (HEALTH + "    outlier_detection: {max_ejection_percent: 101}",
     "services[0].outlier_detection.max_ejection_percent", 4, "must be at most 100"),
    (HEALTH + "    outlier_detection: {interval: 10s}",
     "services[0].outlier_detection.interval", 4, "unknown key 'interval'"),
    (HEALTH + "    retries: 2", "services[0].retries", 4, "expected a mapping, got an integer"),
    (HEALTH + "    retries: {attempts: -1}", "services[0].retries.attempts", 4,
     "must be at least 0"),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "path", "line", "message"),
    HEALTH_ERROR_CASES,
    ids=[f"{index}-{case[1]}" for index, case in enumerate(HEALTH_ERROR_CASES)],
)
def test_health_errors_name_their_path_and_line(
    text: str, path: str, line: int, message: str
) -> None:
    errors = errors_of(text)
    prefix = f"{path}: line {line}: "
    assert any(error.startswith(prefix) and message in error for error in errors), errors
