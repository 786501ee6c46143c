"""The pure grayscale decision: rules, the keyed split, stickiness, service matching."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    Address,
    FieldMatch,
    HashSource,
    Rule,
    Service,
    ServiceMatch,
    Split,
    StickyCookie,
    Version,
)
from proxy.routing import (
    REGEX_CACHE_SIZE,
    REGEX_CACHE_VALUE,
    RequestView,
    Router,
    ServiceRouter,
    hash_candidates,
    hash_version,
    normalize_host,
    parse_cookies,
    rendezvous,
    version_seed,
)

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"user-{i}" for i in range(20_000)]
SIGMAS = 5


def make_service(
    weights: Mapping[str, float],
    *,
    rules: Sequence[Rule] = (),
    hash_on: Sequence[HashSource] = (),
    sticky: StickyCookie | None = None,
    salt: str = "",
    name: str = "web",
    host: str = "*",
    path_prefix: str = "/",
) -> Service:
    versions = tuple(
        Version(version, (Address("127.0.0.1", 9000 + i),)) for i, version in enumerate(weights)
    )
    return Service(
        name=name,
        versions=versions,
        split=Split(dict(weights), tuple(hash_on), sticky, salt),
        baseline=versions[0].name,
        match=ServiceMatch(host, path_prefix),
        rules=tuple(rules),
    )


def view(
    headers: Mapping[str, str] | None = None,
    *,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    ip: str = "203.0.113.7",
) -> RequestView:
    """A request as the data plane builds it: header names lower-cased."""
    lowered = {name.lower(): value for name, value in (headers or {}).items()}
    return RequestView(method, path, query, lowered, ip)


def by_user_header(weights: Mapping[str, float], salt: str = "") -> ServiceRouter:
    return ServiceRouter(
        make_service(weights, hash_on=[HashSource("header", "x-user-id")], salt=salt)
    )


def assert_shares(counts: Mapping[str, int], weights: Mapping[str, float], total: int) -> None:
    weight_sum = sum(weights.values())
    for name, weight in weights.items():
        share = weight / weight_sum
        sigma = math.sqrt(total * share * (1 - share))
        assert abs(counts.get(name, 0) - total * share) <= SIGMAS * sigma + 1, (name, counts)


# --- strategies -----------------------------------------------------------------------------

weight = st.one_of(st.integers(0, 10_000), st.just(0.0), st.floats(0.01, 10_000.0))


@st.composite
def weight_vectors(draw: st.DrawFn, min_versions: int, max_versions: int) -> dict[str, float]:
    count = draw(st.integers(min_versions, max_versions))
    values = draw(st.lists(weight, min_size=count, max_size=count).filter(any))
    return {f"v{i}": float(value) for i, value in enumerate(values)}


@st.composite
def weight_changes(
    draw: st.DrawFn, min_versions: int, max_versions: int
) -> tuple[dict[str, float], dict[str, float]]:
    old = draw(weight_vectors(min_versions, max_versions))
    values = draw(st.lists(weight, min_size=len(old), max_size=len(old)).filter(any))
    return old, dict(zip(old, map(float, values), strict=True))


VERSION_COUNTS = pytest.mark.parametrize(
    ("min_versions", "max_versions"), [(2, 2), (3, 6)], ids=["two", "three-or-more"]
)


# --- (1) determinism ------------------------------------------------------------------------


@VERSION_COUNTS
@settings(max_examples=50, deadline=None)
@given(data=st.data(), key=st.text(min_size=1, max_size=40), salt=st.text(max_size=20))
def test_same_key_same_version_in_separate_routers(
    data: st.DataObject, key: str, salt: str, min_versions: int, max_versions: int
) -> None:
    weights = data.draw(weight_vectors(min_versions, max_versions))
    first, second = by_user_header(weights, salt), by_user_header(weights, salt)
    request = view({"x-user-id": key})
    expected = hash_version(key, weights, salt)
    assert weights[expected] > 0
    assert first.decide(request) == (expected, None, "split;key=header:x-user-id")
    assert first.decide(request) == second.decide(view({"x-user-id": key}))


def test_same_choice_in_another_process_with_another_hash_seed() -> None:
    weights = {"stable": 70.0, "canary": 20.0, "beta": 10.0}
    script = (
        "import json, sys; from proxy.routing import hash_version; "
        f"print(json.dumps([hash_version(k, {weights!r}, 'salt') for k in sys.argv[1:]]))"
    )
    keys = [*KEYS[:200], "usér-ü", "\u4e2d\u6587", ""]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, *keys],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(result.stdout) == [hash_version(k, weights, "salt") for k in keys]


def test_pinned_values_keep_users_on_their_version_across_releases() -> None:
    # Changing the hash changes every user's version on upgrade: these values must not move.
    assert version_seed("", "stable") == 3936003274
    assert version_seed("release-2026-11", "canary") == 1195133682
    chosen = [hash_version(f"user-{i}", {"a": 1, "b": 1, "c": 1}, "s") for i in range(12)]
    assert chosen == ["a", "a", "b", "a", "c", "b", "b", "a", "a", "c", "c", "a"]


def test_lone_surrogates_in_a_key_hash_without_crashing() -> None:
    # mmh3 5.x segfaults on a str holding lone surrogates; routing must hash bytes.
    router = by_user_header({"stable": 50, "canary": 50})
    first = router.decide(view({"x-user-id": "a\udcff\ud800b"}))
    assert first == router.decide(view({"x-user-id": "a\udcff\ud800b"}))


# --- (2) monotonicity -----------------------------------------------------------------------


@VERSION_COUNTS
@settings(max_examples=100, deadline=None)
@given(data=st.data(), salt=st.text(max_size=10))
def test_monotone_under_any_weight_change(
    data: st.DataObject, salt: str, min_versions: int, max_versions: int
) -> None:
    old, new = data.draw(weight_changes(min_versions, max_versions))
    before, after = hash_candidates(old, salt), hash_candidates(new, salt)
    for key in KEYS[:300]:
        was, now = rendezvous(key, before), rendezvous(key, after)
        if was != now:
            # new[now] / new[was] > old[now] / old[was], without dividing by zero
            assert new[now] * old[was] > old[now] * new[was], (key, was, now)


def test_canary_users_stay_on_the_canary_as_it_grows_and_only_they_leave_as_it_shrinks() -> None:
    steps = [0.0, 10.0, 20.0, 50.0, 100.0]
    canary_users = []
    for canary in steps:
        candidates = hash_candidates({"stable": 100 - canary, "canary": canary}, "r1")
        canary_users.append({key for key in KEYS if rendezvous(key, candidates) == "canary"})
    for smaller, larger in pairwise(canary_users):
        assert smaller < larger  # growing keeps every canary user and adds new ones
    assert not canary_users[0]
    assert canary_users[-1] == set(KEYS)


def test_raising_one_of_three_moves_users_only_to_it() -> None:
    before = hash_candidates({"a": 50, "b": 30, "c": 20}, "")
    after = hash_candidates({"a": 50, "b": 30, "c": 40}, "")
    moves = Counter(
        (was, now)
        for key in KEYS
        if (was := rendezvous(key, before)) != (now := rendezvous(key, after))
    )
    assert set(moves) == {("a", "c"), ("b", "c")}
    # c's share rises from 20 % to 1/3: about 13.3 % of all users move, a and b in proportion.
    assert abs(sum(moves.values()) / len(KEYS) - (40 / 120 - 20 / 100)) < 0.01


# --- (3) shares -----------------------------------------------------------------------------

SHARE_CASES = [
    {"stable": 90, "canary": 10},
    {"stable": 50, "canary": 50},
    {"stable": 99.99, "canary": 0.01},
    {"a": 1, "b": 1, "c": 1},
    {"a": 70, "b": 20, "c": 10},
    {"a": 5, "b": 0, "c": 95},
    {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
]


@pytest.mark.parametrize("weights", SHARE_CASES, ids=str)
def test_keyed_split_shares_follow_the_weights(weights: dict[str, float]) -> None:
    candidates = hash_candidates(weights, "release-1")
    counts = Counter(rendezvous(key, candidates) for key in KEYS)
    assert_shares(counts, weights, len(KEYS))


@pytest.mark.parametrize("weights", SHARE_CASES, ids=str)
def test_random_draw_shares_follow_the_weights(weights: dict[str, float]) -> None:
    router = ServiceRouter(make_service(weights))
    random.seed(7)
    counts = Counter(router.decide(view())[0] for _ in range(20_000))
    assert_shares(counts, weights, 20_000)


def test_new_sticky_clients_are_spread_by_weight() -> None:
    weights = {"stable": 80, "canary": 20}
    router = ServiceRouter(make_service(weights, sticky=StickyCookie("gp")))
    random.seed(11)
    counts = Counter(router.decide(view())[0] for _ in range(20_000))
    assert_shares(counts, weights, 20_000)


def test_zero_weight_versions_never_win() -> None:
    keyed = by_user_header({"a": 0, "b": 1, "c": 0})
    drawn = ServiceRouter(make_service({"a": 0, "b": 1, "c": 0}))
    assert {keyed.decide(view({"x-user-id": key}))[0] for key in KEYS[:2000]} == {"b"}
    assert {drawn.decide(view())[0] for _ in range(2000)} == {"b"}


# --- (4) rules ------------------------------------------------------------------------------


def rule_router(*rules: Rule, weights: Mapping[str, float] | None = None) -> ServiceRouter:
    return ServiceRouter(make_service(weights or {"stable": 100, "canary": 0}, rules=rules))


def pinned(router: ServiceRouter, request: RequestView) -> bool:
    """True when the request reached the 0-weight canary, which only a rule can do."""
    return router.decide(request)[:2] == ("canary", None)


def test_first_matching_rule_wins_and_rules_come_before_the_split() -> None:
    router = rule_router(
        Rule("canary", headers=(FieldMatch("x-canary", value="always"),)),
        Rule("stable", headers=(FieldMatch("x-canary", value="never"),)),
        Rule("stable", headers=(FieldMatch("x-canary", present=True),)),
        Rule("canary", headers=(FieldMatch("x-canary", present=True),)),
        weights={"stable": 0, "canary": 100},
    )
    assert router.decide(view({"x-canary": "always"})) == ("canary", None, "rule=0")
    assert router.decide(view({"x-canary": "never"})) == ("stable", None, "rule=1")
    assert router.decide(view({"x-canary": "other"})) == ("stable", None, "rule=2")  # not 3
    assert router.decide(view()) == ("canary", None, "split;random")  # no rule: the split


def test_a_rule_reaches_a_zero_weight_version_even_with_a_hash_key() -> None:
    service = make_service(
        {"blue": 100, "green": 0},
        rules=[Rule("green", headers=(FieldMatch("x-preview", value="1"),))],
        hash_on=[HashSource("header", "x-user-id")],
        sticky=StickyCookie("gp"),
    )
    router = ServiceRouter(service)
    assert router.decide(view({"x-preview": "1", "x-user-id": "u1"})) == ("green", None, "rule=0")
    assert router.decide(view({"x-preview": "1"}))[:2] == ("green", None)  # no sticky cookie set
    assert router.decide(view({"x-user-id": "u1"}))[:2] == ("blue", None)


def test_header_value_is_exact_and_the_name_case_insensitive() -> None:
    router = rule_router(Rule("canary", headers=(FieldMatch("X-Canary", value="Always"),)))
    assert pinned(router, view({"X-CANARY": "Always"}))
    assert pinned(router, view({"x-canary": "Always"}))
    assert not pinned(router, view({"x-canary": "always"}))
    assert not pinned(router, view({"x-canary": "Always "}))
    assert not pinned(router, view({"x-canary": "Always, Always"}))  # a repeated header
    assert not pinned(router, view())


def test_header_regex_matches_anywhere_unless_anchored() -> None:
    anywhere = rule_router(
        Rule("canary", headers=(FieldMatch("user-agent", regex=re.compile("(iPhone|Android)")),))
    )
    anchored = rule_router(
        Rule("canary", headers=(FieldMatch("user-agent", regex=re.compile("^Android$")),))
    )
    mobile = view({"user-agent": "Mozilla/5.0 (Linux; Android 14)"})
    assert pinned(anywhere, mobile)
    assert not pinned(anywhere, view({"user-agent": "curl/8.0"}))
    assert not pinned(anywhere, view())
    assert not pinned(anchored, mobile)
    assert pinned(anchored, view({"user-agent": "Android"}))


def test_regex_verdicts_stay_right_when_values_repeat_and_outgrow_the_cache() -> None:
    router = rule_router(
        Rule("canary", headers=(FieldMatch("user-agent", regex=re.compile("Android")),))
    )
    for round_ in range(2):  # the second round answers from remembered verdicts
        for n in range(REGEX_CACHE_SIZE + 10):
            agent = f"Mozilla/5.0 (Linux; {'Android' if n % 3 == 0 else 'X11'} {n})"
            assert pinned(router, view({"user-agent": agent})) == (n % 3 == 0), (round_, n)
    long_value = "x" * REGEX_CACHE_VALUE + "Android"  # too long to be remembered
    assert pinned(router, view({"user-agent": long_value}))
    assert pinned(router, view({"user-agent": long_value}))


def test_header_present() -> None:
    router = rule_router(Rule("canary", headers=(FieldMatch("x-debug", present=True),)))
    assert pinned(router, view({"x-debug": ""}))
    assert pinned(router, view({"X-Debug": "yes"}))
    assert not pinned(router, view({"x-debugging": "yes"}))


def test_cookie_conditions() -> None:
    exact = rule_router(Rule("canary", cookies=(FieldMatch("canary", value="always"),)))
    regex = rule_router(Rule("canary", cookies=(FieldMatch("plan", regex=re.compile("pro")),)))
    present = rule_router(Rule("canary", cookies=(FieldMatch("beta", present=True),)))
    assert pinned(exact, view({"cookie": "a=1; canary=always; b=2"}))
    assert pinned(exact, view({"cookie": 'canary="always"'}))
    assert not pinned(exact, view({"cookie": "canary=never; canary=always"}))  # first wins
    assert not pinned(exact, view({"x-canary": "always"}))
    assert pinned(regex, view({"cookie": "plan=enterprise-pro-2"}))
    assert not pinned(regex, view({"cookie": "plan=free"}))
    assert pinned(present, view({"cookie": "beta="}))
    assert not pinned(present, view({"cookie": "alpha=1"}))


def test_query_conditions() -> None:
    exact = rule_router(Rule("canary", query=(FieldMatch("variant", value="b c"),)))
    regex = rule_router(Rule("canary", query=(FieldMatch("ref", regex=re.compile(r"^news")),)))
    present = rule_router(Rule("canary", query=(FieldMatch("preview", present=True),)))
    assert pinned(exact, view(query="x=1&variant=b+c"))
    assert pinned(exact, view(query="variant=b%20c&variant=a"))
    assert not pinned(exact, view(query="variant=a&variant=b+c"))  # first value counts
    assert pinned(regex, view(query="ref=newsletter"))
    assert not pinned(regex, view(query="ref=old-news"))
    assert pinned(present, view(query="preview"))
    assert pinned(present, view(query="a=1&preview="))
    assert not pinned(present, view(query=""))


def test_path_prefix_and_method_conditions() -> None:
    router = rule_router(Rule("canary", path_prefix="/api/v2", methods=frozenset({"GET", "HEAD"})))
    assert pinned(router, view(path="/api/v2/users"))
    assert pinned(router, view(method="HEAD", path="/api/v2"))
    assert not pinned(router, view(method="POST", path="/api/v2/users"))
    assert not pinned(router, view(path="/api/v1/users"))


def test_source_cidr_v4_and_v6() -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    router = rule_router(Rule("canary", sources=networks))
    assert pinned(router, view(ip="10.1.2.3"))
    assert pinned(router, view(ip="::ffff:10.1.2.3"))  # IPv4-mapped, from a dual-stack socket
    assert pinned(router, view(ip="2001:db8::1"))
    assert not pinned(router, view(ip="11.0.0.1"))
    assert not pinned(router, view(ip="2001:db9::1"))
    assert not pinned(router, view(ip="not-an-ip"))
    assert not pinned(router, view(ip=""))


def test_all_conditions_of_a_rule_must_hold() -> None:
    rule = Rule(
        "canary",
        headers=(FieldMatch("x-team", value="qa"),),
        cookies=(FieldMatch("session", present=True),),
        query=(FieldMatch("debug", value="1"),),
        path_prefix="/app",
        methods=frozenset({"GET"}),
        sources=(ipaddress.ip_network("192.168.0.0/16"),),
    )
    router = rule_router(rule)
    facts = {
        "headers": {"x-team": "qa", "cookie": "session=s1"},
        "method": "GET",
        "path": "/app/home",
        "query": "debug=1",
        "ip": "192.168.1.10",
    }
    assert pinned(router, view(**facts))  # type: ignore[arg-type]
    for fact, wrong in [
        ("headers", {"x-team": "qa"}),
        ("headers", {"x-team": "dev", "cookie": "session=s1"}),
        ("method", "PUT"),
        ("path", "/other"),
        ("query", "debug=0"),
        ("ip", "10.0.0.1"),
    ]:
        assert not pinned(router, view(**{**facts, fact: wrong})), fact  # type: ignore[arg-type]


def test_an_empty_rule_matches_every_request() -> None:
    assert pinned(rule_router(Rule("canary")), view())


# --- (5) stickiness and keys -----------------------------------------------------------------

STICKY_COOKIE = re.compile(r"gp=([0-9a-f]{16}); Path=/; Max-Age=86400; HttpOnly; SameSite=Lax")


def test_keyless_client_gets_a_cookie_that_routes_it_the_same_afterwards() -> None:
    weights = {"stable": 50, "canary": 50}
    router = ServiceRouter(make_service(weights, sticky=StickyCookie("gp", 86400), salt="s"))
    for _ in range(200):
        version, set_cookie, reason = router.decide(view())
        assert set_cookie is not None and reason == "split;key=sticky"
        match = STICKY_COOKIE.fullmatch(set_cookie)
        assert match, set_cookie
        key = match.group(1)
        assert version == hash_version(key, weights, "s")
        again = router.decide(view({"cookie": f"other=1; gp={key}"}))
        assert again == (version, None, "split;key=sticky")


def test_sticky_cookie_without_max_age_is_a_session_cookie() -> None:
    router = ServiceRouter(make_service({"a": 1, "b": 1}, sticky=StickyCookie("gp")))
    _, set_cookie, _ = router.decide(view())
    assert set_cookie is not None
    assert re.fullmatch(r"gp=[0-9a-f]{16}; Path=/; HttpOnly; SameSite=Lax", set_cookie)


def test_no_sticky_cookie_when_a_hash_on_key_is_present() -> None:
    weights = {"stable": 50, "canary": 50}
    router = ServiceRouter(
        make_service(
            weights, hash_on=[HashSource("header", "X-User-Id")], sticky=StickyCookie("gp")
        )
    )
    for key in KEYS[:200]:
        expected = hash_version(key, weights)
        keyed = (expected, None, "split;key=header:x-user-id")
        assert router.decide(view({"X-User-Id": key})) == keyed
        # the hash_on key takes precedence over an existing sticky cookie
        assert router.decide(view({"x-user-id": key, "cookie": "gp=zzz"})) == keyed


def test_first_present_hash_source_is_the_key() -> None:
    weights = {"a": 1, "b": 1, "c": 1}
    sources = [
        HashSource("header", "x-user-id"),
        HashSource("cookie", "session"),
        HashSource("query", "uid"),
        HashSource("client_ip"),
    ]
    router = ServiceRouter(make_service(weights, hash_on=sources))
    for key in KEYS[:100]:
        version = hash_version(key, weights)
        everything = {"x-user-id": key, "cookie": "session=other"}
        assert router.decide(view(everything, query="uid=x")) == (
            version,
            None,
            "split;key=header:x-user-id",
        )
        by_cookie = router.decide(view({"x-user-id": "", "cookie": f"session={key}"}))
        assert by_cookie == (version, None, "split;key=cookie:session")
        by_query = router.decide(view(query=f"uid={key}&uid=other"))
        assert by_query == (version, None, "split;key=query:uid")
        assert router.decide(view(query="uid=", ip=key)) == (version, None, "split;key=client_ip")


def test_without_key_or_sticky_cookie_each_request_is_drawn() -> None:
    router = ServiceRouter(make_service({"a": 1, "b": 1}, hash_on=[HashSource("header", "x-u")]))
    random.seed(3)
    decisions = {router.decide(view()) for _ in range(200)}
    assert decisions == {("a", None, "split;random"), ("b", None, "split;random")}


# --- (6) salt -------------------------------------------------------------------------------


def test_changing_the_salt_reshuffles_users() -> None:
    weights = {"stable": 50, "canary": 50}
    before, after = hash_candidates(weights, "release-1"), hash_candidates(weights, "release-2")
    moved = sum(rendezvous(key, before) != rendezvous(key, after) for key in KEYS[:4000])
    assert 0.45 < moved / 4000 < 0.55  # independent buckets: half of the users move


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [{"a": 0, "b": 0}, {"a": -1, "b": 2}, {"a": math.inf, "b": 1}, {"a": math.nan}]
)
def test_unusable_weights_are_refused(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        ServiceRouter(make_service(weights))


def test_unknown_versions_and_empty_conditions_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown versions"):
        rule_router(Rule("missing"))
    with pytest.raises(ValueError, match="one of value, regex, present"):
        rule_router(Rule("canary", headers=(FieldMatch("x-a"),)))


# --- request facts --------------------------------------------------------------------------


def test_cookies_are_parsed_leniently() -> None:
    request = view({"cookie": ' a=1;b = two ; junk; =x; c="quoted"; a=3; d=e=f'})
    assert request.cookie("a") == "1"
    assert request.cookie("b") == "two"
    assert request.cookie("c") == "quoted"
    assert request.cookie("d") == "e=f"
    assert request.cookie("junk") is None
    assert view().cookie("a") is None


@given(
    header=st.text(alphabet='ab =;"', max_size=24),
    names=st.lists(st.sampled_from(["a", "b", "ab", "ba", "a b", "x"]), min_size=1, max_size=4),
)
def test_a_cookie_reads_the_same_whatever_was_asked_before(header: str, names: list[str]) -> None:
    """Asking for a cookie the header cannot hold skips parsing it: the answers are the ones
    a parse of the whole header gives, in any order of questions."""
    request = view({"cookie": header})
    for name in names:
        assert request.cookie(name) == parse_cookies(header).get(name)


def test_query_parameters_are_decoded_and_the_first_value_counts() -> None:
    request = view(query="a=1&a=2&b=&c=x+y%21&d")
    assert request.query_param("a") == "1"
    assert request.query_param("b") == ""
    assert request.query_param("c") == "x y!"
    assert request.query_param("d") == ""
    assert request.query_param("e") is None
    assert request.header("x") is None


# --- (7) service matching --------------------------------------------------------------------


def services(*matches: tuple[str, str]) -> Router:
    return Router(
        [
            make_service({"v": 1}, name=f"s{i}", host=host, path_prefix=prefix)
            for i, (host, prefix) in enumerate(matches)
        ]
    )


def matched(router: Router, host: str, path: str = "/") -> str | None:
    found = router.match(host, path)
    return None if found is None else found.service.name


def test_host_match_ignores_port_case_and_trailing_dot() -> None:
    router = services(("example.com", "/"), ("[::1]", "/"), ("10.0.0.1", "/"))
    assert matched(router, "example.com") == "s0"
    assert matched(router, "Example.COM:8080") == "s0"
    assert matched(router, "example.com.") == "s0"
    assert matched(router, "[::1]:8080") == "s1"
    assert matched(router, "[::1]") == "s1"
    assert matched(router, "::1") == "s1"
    assert matched(router, "10.0.0.1:80") == "s2"
    assert matched(router, "www.example.com") is None
    assert matched(router, "") is None


def test_wildcard_hosts() -> None:
    router = services(("*.example.com", "/"), ("*", "/fallback"))
    assert matched(router, "a.example.com") == "s0"
    assert matched(router, "a.b.example.com:443") == "s0"
    assert matched(router, "example.com") is None
    assert matched(router, ".example.com") is None
    assert matched(router, "badexample.com") is None
    assert matched(router, "anything", "/fallback/x") == "s1"
    assert matched(router, "", "/fallback") == "s1"


def test_path_prefixes_and_first_match_wins() -> None:
    router = services(
        ("*", "/admin"),
        ("example.com", "/api"),
        ("*.example.com", "/"),
        ("example.com", "/"),
        ("example.com", "/api/v2"),  # shadowed by s1
        ("*", "/"),
    )
    assert matched(router, "example.com", "/admin/users") == "s0"  # before the exact host
    assert matched(router, "example.com", "/api/v2/x") == "s1"
    assert matched(router, "example.com", "/apix") == "s1"  # a plain string prefix
    assert matched(router, "example.com", "/") == "s3"
    assert matched(router, "www.example.com", "/api") == "s2"
    assert matched(router, "other.org", "/") == "s5"
    assert matched(router, "other.org", "/admin") == "s0"


def test_no_matching_service() -> None:
    router = services(("example.com", "/app"))
    assert router.match("example.com", "/other") is None
    assert router.match("example.org", "/app") is None


def test_service_lookup_by_name() -> None:
    router = services(("*", "/"), ("a.com", "/"))
    assert [r.service.name for r in router.services] == ["s0", "s1"]
    assert router.service("s1") is router.services[1]
    with pytest.raises(KeyError):
        router.service("missing")


@pytest.mark.parametrize(
    ("host", "expected"),
    [("A.com", "a.com"), ("a.com:80", "a.com"), ("[2001:DB8::1]:443", "2001:db8::1"), ("", "")],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected
