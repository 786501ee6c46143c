"""The control API on a real socket: auth, reads, atomic changes, reload, errors, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Address, ConfigError
from proxy.control import create_app
from proxy.errors import UnknownService
from proxy.loader import load_config
from proxy.metrics import Metrics
from proxy.state import LiveState, Snapshot

CONFIG = """\
listen: "127.0.0.1:18080"
control:
  listen: "127.0.0.1:19901"
services:
  - name: web
    baseline: stable
    fallback: stable
    versions:
      stable: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
      canary: {endpoints: ["127.0.0.1:9101"]}
    split:
      weights: {stable: 90, canary: 10}
      hash_on: [{header: x-user-id}, {cookie: session}, {client_ip: true}]
      sticky_cookie: {name: gp_sticky, max_age: 86400}
      salt: release-1
    rules:
      - match: {header: {name: X-Canary, value: always}}
        version: canary
      - match: {header: {name: user-agent, regex: "(iPhone|Android)"}}
        version: canary
  - name: api
    match: {host: api.example.com, path_prefix: /v1}
    versions:
      blue: {endpoints: ["127.0.0.1:9201"]}
      green: {endpoints: ["127.0.0.1:9202"]}
    split:
      weights: {blue: 100, green: 0}
"""

Scenario = Callable[[aiohttp.ClientSession], Awaitable[None]]
DOWN = Address("127.0.0.1", 9002)


def live_state(tmp_path: Path, text: str = CONFIG) -> LiveState:
    path = tmp_path / "grayproxy.yaml"
    path.write_text(text)
    return LiveState(load_config(str(path)), str(path))


def with_token(tmp_path: Path, token: str) -> str:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    return CONFIG.replace(
        'listen: "127.0.0.1:19901"', f'listen: "127.0.0.1:19901"\n  token_file: {token_file}'
    )


def healthy(service: str, version: str, address: Address) -> bool:
    return address != DOWN


def serve(
    state: LiveState,
    scenario: Scenario,
    *,
    metrics: Metrics | None = None,
    ready: bool = True,
    endpoint_health: Callable[[str, str, Address], bool] = healthy,
) -> None:
    """Run the control app on 127.0.0.1:0 and play ``scenario`` against it."""

    async def main() -> None:
        app = create_app(
            state, metrics or Metrics(), endpoint_health=endpoint_health, is_ready=lambda: ready
        )
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                await scenario(session)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def expect_error(response: aiohttp.ClientResponse, status: int) -> dict[str, object]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body["error"], str)
    assert isinstance(body["details"], list)
    assert "Traceback" not in await response.text()
    return dict(body)


def samples_of(text: str, name: str, *extra_labels: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name`` in a scrape, keyed by (service, version, *extra_labels)."""
    keys = ("service", "version", *extra_labels)
    return {
        tuple(sample.labels[key] for key in keys): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def weights_of(service_json: dict[str, object]) -> dict[str, object]:
    versions = service_json["versions"]
    assert isinstance(versions, dict)
    return {name: version["weight"] for name, version in versions.items()}


# --- auth ------------------------------------------------------------------------------------


def test_api_needs_the_bearer_token(tmp_path: Path) -> None:
    state = live_state(tmp_path, with_token(tmp_path, "s3cret"))

    async def scenario(session: aiohttp.ClientSession) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            async with session.get("/api/v1/services", headers=headers) as response:
                await expect_error(response, 401)
                assert response.headers["WWW-Authenticate"] == "Bearer"
        async with session.post("/api/v1/services/web/rollback") as response:
            await expect_error(response, 401)
        async with session.get("/api/v1/nowhere") as response:
            await expect_error(response, 401)  # no route discovery without the token

        right = {"Authorization": "Bearer s3cret"}
        async with session.get("/api/v1/services", headers=right) as response:
            assert response.status == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            async with session.get(path) as response:
                assert response.status == 200, path

    serve(state, scenario)
    assert state.snapshot.generation == 1  # the unauthorized rollback changed nothing


def test_without_a_token_the_api_is_open(tmp_path: Path) -> None:
    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.get("/api/v1/services") as response:
            assert response.status == 200

    serve(live_state(tmp_path), scenario)


# --- reads -----------------------------------------------------------------------------------


def test_service_reads_as_the_spec_shows(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.version("web", "canary").observe(200, 0.003)
    metrics.version("web", "canary").observe(502, 0.004)

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.get("/api/v1/services/web") as response:
            assert response.status == 200
            web_json = await response.json()
        assert web_json["name"] == "web"
        assert web_json["generation"] == 1
        assert web_json["baseline"] == "stable"
        assert web_json["fallback"] == "stable"
        assert web_json["match"] == {"host": "*", "path_prefix": "/"}
        assert weights_of(web_json) == {"stable": 90, "canary": 10}
        assert web_json["versions"]["stable"]["endpoints"] == [
            {"address": "127.0.0.1:9001", "healthy": True},
            {"address": "127.0.0.1:9002", "healthy": False},
        ]
        canary_stats = web_json["versions"]["canary"]["stats"]
        assert canary_stats["requests"] == 2
        assert canary_stats["errors"] == 1
        assert canary_stats["error_rate"] == 0.5
        assert 3.0 <= canary_stats["p50_ms"] <= 3.0 * 1.05
        assert 4.0 <= canary_stats["p99_ms"] <= 4.0 * 1.05
        assert web_json["versions"]["stable"]["stats"]["requests"] == 0
        assert web_json["rules"] == [
            {"match": {"header": [{"name": "x-canary", "value": "always"}]}, "version": "canary"},
            {
                "match": {"header": [{"name": "user-agent", "regex": "(iPhone|Android)"}]},
                "version": "canary",
            },
        ]
        assert web_json["split"] == {
            "hash_on": [{"header": "x-user-id"}, {"cookie": "session"}, {"client_ip": True}],
            "sticky_cookie": {"name": "gp_sticky", "max_age": 86400},
            "salt": "release-1",
        }

        async with session.get("/api/v1/services") as response:
            listing = await response.json()
        assert listing["generation"] == 1
        assert [s["name"] for s in listing["services"]] == ["web", "api"]
        api = listing["services"][1]
        assert api["match"] == {"host": "api.example.com", "path_prefix": "/v1"}
        assert api["fallback"] is None
        assert api["baseline"] == "blue"  # the first version by default
        assert api["rules"] == []
        assert api["split"] == {"hash_on": [], "sticky_cookie": None, "salt": ""}

    serve(live_state(tmp_path), scenario, metrics=metrics)


def test_unknown_service_is_404(tmp_path: Path) -> None:
    async def scenario(session: aiohttp.ClientSession) -> None:
        calls = [
            session.get("/api/v1/services/nope"),
            session.put("/api/v1/services/nope/weights", json={"a": 1}),
            session.post("/api/v1/services/nope/promote", json={"version": "a"}),
            session.post("/api/v1/services/nope/rollback"),
        ]
        for call in calls:
            async with call as response:
                body = await expect_error(response, 404)
                assert "nope" in str(body["error"])

    serve(live_state(tmp_path), scenario)


def test_unknown_route_and_wrong_method_are_json_errors(tmp_path: Path) -> None:
    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.get("/api/v2/everything") as response:
            await expect_error(response, 404)
        async with session.delete("/api/v1/services/web") as response:
            await expect_error(response, 405)
            assert "GET" in response.headers["Allow"]
        async with session.get("/api/v1/services/web/weights") as response:
            await expect_error(response, 405)

    serve(live_state(tmp_path), scenario)


def test_unexpected_failure_is_a_json_500(tmp_path: Path) -> None:
    def broken_health(service: str, version: str, address: Address) -> bool:
        raise RuntimeError("health table exploded")

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.get("/api/v1/services/web") as response:
            body = await expect_error(response, 500)
            assert "exploded" not in str(body)

    serve(live_state(tmp_path), scenario, endpoint_health=broken_health)


# --- changes ---------------------------------------------------------------------------------


def test_weights_change_shows_in_the_api_and_in_metrics(tmp_path: Path) -> None:
    state = live_state(tmp_path)

    async def scenario(session: aiohttp.ClientSession) -> None:
        body = {"stable": 50, "canary": 50}
        async with session.put("/api/v1/services/web/weights", json=body) as response:
            assert response.status == 200
            changed = await response.json()
        assert changed["generation"] == 2
        assert weights_of(changed) == {"stable": 50, "canary": 50}

        async with session.get("/api/v1/services/web") as response:
            assert weights_of(await response.json()) == {"stable": 50, "canary": 50}
        async with session.get("/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await response.text()
        weights = samples_of(text, "grayproxy_weight")
        assert weights[("web", "canary")] == 50.0
        assert weights[("web", "stable")] == 50.0
        assert weights[("api", "blue")] == 100.0

    serve(state, scenario)
    assert state.snapshot.router.service("web").service.split.weights == {
        "stable": 50,
        "canary": 50,
    }


def test_invalid_weights_are_refused_and_change_nothing(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    before = state.snapshot

    async def scenario(session: aiohttp.ClientSession) -> None:
        refused = [
            ({"stable": 90, "canary": -10}, "canary: must not be negative"),
            ({"stable": 0, "canary": 0}, ""),
            ({"stable": 50, "blue": 50}, "blue"),
            (["stable", 100], ""),
        ]
        for body, expected in refused:
            async with session.put("/api/v1/services/web/weights", json=body) as response:
                error = await expect_error(response, 400)
                details = error["details"]
                assert isinstance(details, list) and details, body
                assert any(expected in detail for detail in details), details

        bad_json = [b"{not json", b"", b"\xff\xfe"]
        for raw in bad_json:
            async with session.put("/api/v1/services/web/weights", data=raw) as response:
                error = await expect_error(response, 400)
                assert error["error"] == "request body is not valid JSON"

    serve(state, scenario)
    assert state.snapshot is before
    assert state.snapshot.generation == 1


def test_weights_over_the_maximum_are_refused_not_rounded(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    before = state.snapshot

    async def scenario(session: aiohttp.ClientSession) -> None:
        # As JSON text: 1e35 is a float that would pass the 0.01 check; 1 and 400 zeros is
        # an int no float can hold.
        for raw in (b'{"stable": 1e35, "canary": 1}', b'{"stable": 1' + b"0" * 400 + b"}"):
            async with session.put("/api/v1/services/web/weights", data=raw) as response:
                error = await expect_error(response, 400)
            assert error["error"] == "refused; nothing changed"
            assert error["details"] == [
                "weights.stable: must be at most 1000000 "
                "(weights are ratios: 9 and 1 split like 90 and 10)"
            ]
        assert state.snapshot is before

        body = {"stable": 1_000_000, "canary": 0.01}
        async with session.put("/api/v1/services/web/weights", json=body) as response:
            assert response.status == 200
            assert weights_of(await response.json()) == {"stable": 1_000_000, "canary": 0.01}

    serve(state, scenario)


def test_promote_and_rollback(tmp_path: Path) -> None:
    state = live_state(tmp_path)

    async def scenario(session: aiohttp.ClientSession) -> None:
        promote = "/api/v1/services/web/promote"
        async with session.post(promote, json={"version": "canary"}) as response:
            assert response.status == 200
            promoted = await response.json()
        assert weights_of(promoted) == {"stable": 0, "canary": 100}
        assert promoted["generation"] == 2

        for body in ({"version": "nightly"}, {"version": 7}, {"name": "canary"}, "canary"):
            async with session.post(promote, json=body) as response:
                await expect_error(response, 400)
        async with session.post(promote, data=b"canary") as response:
            await expect_error(response, 400)

        async with session.post("/api/v1/services/web/rollback") as response:
            assert response.status == 200
            rolled_back = await response.json()
        assert weights_of(rolled_back) == {"stable": 100, "canary": 0}
        assert rolled_back["generation"] == 3

    serve(state, scenario)


# --- reload ----------------------------------------------------------------------------------


def test_reload_applies_the_file_and_replaces_runtime_weights(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    state.set_weights("web", {"stable": 1, "canary": 1})  # generation 2, a runtime change
    assert state.config_path is not None
    Path(state.config_path).write_text(
        CONFIG.replace("{stable: 90, canary: 10}", "{stable: 70, canary: 30}")
    )

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.post("/api/v1/reload") as response:
            assert response.status == 200
            assert await response.json() == {"generation": 3, "warnings": []}
        async with session.get("/api/v1/services/web") as response:
            reloaded = await response.json()
        assert reloaded["generation"] == 3
        assert weights_of(reloaded) == {"stable": 70, "canary": 30}

    serve(state, scenario)


def test_reload_of_a_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    before = state.snapshot
    assert state.config_path is not None
    broken = CONFIG.replace("{stable: 90, canary: 10}", "{stable: 90, canary: -10}").replace(
        "version: canary", "version: nightly", 1
    )
    Path(state.config_path).write_text(broken)

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.post("/api/v1/reload") as response:
            error = await expect_error(response, 400)
        details = error["details"]
        assert isinstance(details, list)
        assert len(details) >= 2, details  # every error, not just the first
        assert any("must not be negative" in detail for detail in details)
        assert any("nightly" in detail for detail in details)
        async with session.get("/api/v1/services/web") as response:
            still = await response.json()
        assert still["generation"] == 1
        assert weights_of(still) == {"stable": 90, "canary": 10}

    serve(state, scenario)
    assert state.snapshot is before


def test_reload_keeps_static_settings_and_warns(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    assert state.config_path is not None
    moved = CONFIG.replace("127.0.0.1:18080", "127.0.0.1:18081").replace(
        "{stable: 90, canary: 10}", "{stable: 80, canary: 20}"
    )
    Path(state.config_path).write_text(moved)

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.post("/api/v1/reload") as response:
            assert response.status == 200
            reloaded = await response.json()
        assert reloaded["generation"] == 2
        assert reloaded["warnings"] == ["listen: changed in the file; a restart applies it"]

    serve(state, scenario)
    assert state.snapshot.config.listen == Address("127.0.0.1", 18080)
    assert state.snapshot.router.service("web").service.split.weights["canary"] == 20


def test_reload_without_a_file_is_refused(tmp_path: Path) -> None:
    config = live_state(tmp_path).snapshot.config
    state = LiveState(config, None)

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.post("/api/v1/reload") as response:
            error = await expect_error(response, 400)
        assert error["details"] == ["reload: no config file; this process runs an embedded config"]

    serve(state, scenario)
    with pytest.raises(ConfigError):
        asyncio.run(state.reload())


# --- health ----------------------------------------------------------------------------------


def test_healthz_and_readyz(tmp_path: Path) -> None:
    state = live_state(tmp_path)

    async def not_ready(session: aiohttp.ClientSession) -> None:
        async with session.get("/healthz") as response:
            assert (response.status, await response.text()) == (200, "ok")
        async with session.get("/readyz") as response:
            assert response.status == 503

    async def ready(session: aiohttp.ClientSession) -> None:
        async with session.get("/readyz") as response:
            assert response.status == 200

    serve(state, not_ready, ready=False)
    serve(state, ready, ready=True)


def test_metrics_endpoint_counts_observed_requests(tmp_path: Path) -> None:
    metrics = Metrics()
    stable = metrics.version("web", "stable")
    for _ in range(3):
        stable.observe(200, 0.02)
    stable.upstream_error("timeout")
    stable.observe(504, 5.0)

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with session.get("/metrics") as response:
            text = await response.text()
        requests = samples_of(text, "grayproxy_requests_total", "code")
        assert requests == {("web", "stable", "200"): 3, ("web", "stable", "504"): 1}
        upstream_errors = samples_of(text, "grayproxy_upstream_errors_total", "kind")
        assert upstream_errors[("web", "stable", "timeout")] == 1
        assert upstream_errors[("web", "canary", "timeout")] == 0
        counts = samples_of(text, "grayproxy_request_duration_seconds_count")
        assert counts[("web", "stable")] == 4

    serve(live_state(tmp_path), scenario, metrics=metrics)


# --- the live state itself ---------------------------------------------------------------------


def test_subscribers_see_every_swap_and_only_swaps(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    seen: list[int] = []

    def failing(snapshot: Snapshot) -> None:
        raise RuntimeError("a broken subscriber")

    state.subscribe(failing)
    state.subscribe(lambda snapshot: seen.append(snapshot.generation))

    state.set_weights("web", {"stable": 80, "canary": 20})
    state.promote("web", "canary")
    state.rollback("web")
    asyncio.run(state.reload())
    with pytest.raises(ConfigError):
        state.set_weights("web", {"stable": -1, "canary": 1})
    with pytest.raises(ConfigError):
        state.promote("web", "nightly")
    with pytest.raises(UnknownService):
        state.rollback("nope")

    assert seen == [2, 3, 4, 5]
    assert state.snapshot.generation == 5


def test_a_change_swaps_a_whole_new_snapshot(tmp_path: Path) -> None:
    state = live_state(tmp_path)
    old = state.snapshot
    new = state.set_weights("web", {"stable": 75, "canary": 25})

    assert new is state.snapshot
    assert new.router is not old.router
    assert old.config.services[0].split.weights == {"stable": 90, "canary": 10}  # untouched
    assert new.config.services[0].split.weights == {"stable": 75, "canary": 25}
    assert new.config.services[1] is old.config.services[1]
    assert new.router.service("web").service is new.config.services[0]
    with pytest.raises(UnknownService):
        state.service("nope")
