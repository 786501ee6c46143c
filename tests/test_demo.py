"""`grayproxy demo`: the built-in versions alone, and the whole demo as a real process."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import aiohttp
from aiohttp import web
from yarl import URL

from proxy import demo

from procs import ProxyProcess, http_get

DEMO_ARGS = ["demo", "--port", "${data_port}", "--control-port", "${control_port}"]


def test_each_version_app_says_which_version_it_is() -> None:
    async def scenario() -> None:
        sockets = {name: demo.bind_loopback() for name in ("stable", "canary")}
        runners: list[web.AppRunner] = []
        try:
            for version, sock in sockets.items():
                runner = web.AppRunner(demo.version_app(version))
                await runner.setup()
                runners.append(runner)
                await web.SockSite(runner, sock).start()
            async with aiohttp.ClientSession() as session:
                for version, sock in sockets.items():
                    base = f"http://127.0.0.1:{demo.port_of(sock)}"
                    raw = URL(base + "/some/<path>?q=1", encoded=True)
                    async with session.get(raw) as page:
                        text = await page.text()
                        assert page.content_type == "text/html"
                        assert f"<h1>{version}</h1>" in text
                        assert demo.VERSION_COLOURS[version] in text
                        assert "/some/&lt;path&gt;?q=1" in text
                    async with session.get(base + "/api/info", headers={"x-a": "b"}) as info:
                        answer = await info.json()
                    assert set(answer) == {"version", "path", "headers"}
                    assert answer["version"] == version
                    assert answer["path"] == "/api/info"
                    assert answer["headers"]["x-a"] == "b"
        finally:
            for runner in runners:
                await runner.cleanup()
            for sock in sockets.values():
                sock.close()

    asyncio.run(scenario())


def test_demo_config_is_the_documented_split() -> None:
    config = demo.demo_config("127.0.0.1", 8080, 9901, {"stable": 1001, "canary": 1002})
    (service,) = config.services
    assert service.name == "demo"
    assert dict(service.split.weights) == {"stable": 90, "canary": 10}
    assert [(s.kind, s.name) for s in service.split.hash_on] == [
        ("header", "x-user-id"),
        ("cookie", "session"),
    ]
    assert service.split.sticky_cookie == demo.STICKY_COOKIE
    assert [(r.version, r.headers[0].name, r.headers[0].value) for r in service.rules] == [
        ("canary", "x-canary", "always"),
        ("stable", "x-canary", "never"),
    ]
    assert str(config.control.listen) == "127.0.0.1:9901"
    assert config.control.token is None
    assert [str(v.endpoints[0]) for v in service.versions] == ["127.0.0.1:1001", "127.0.0.1:1002"]


def get_json(url: str, headers: dict[str, str]) -> tuple[str, dict[str, object]]:
    status, response_headers, body = http_get(url, headers)
    assert status == 200, body
    return response_headers["x-grayproxy-version"], json.loads(body)


def test_demo_serves_both_versions_and_stops_cleanly() -> None:
    with ProxyProcess(args=DEMO_ARGS) as proxy:
        assert f"http://127.0.0.1:{proxy.data_port}/api/info" in proxy.stdout
        assert f"export GRAYPROXY_CONTROL={proxy.control_url}" in proxy.stdout
        assert f"in the dashboard: {proxy.control_url}/\n" in proxy.stdout

        version, info = get_json(proxy.data_url + "/api/info", {"x-canary": "always"})
        assert version == info["version"] == "canary"
        assert info["path"] == "/api/info"
        assert isinstance(info["headers"], dict)
        headers = {name.lower(): value for name, value in info["headers"].items()}
        assert headers["x-canary"] == "always"
        assert headers["x-forwarded-for"] == "127.0.0.1"

        version, info = get_json(proxy.data_url + "/api/info?x=1", {"x-canary": "never"})
        assert version == info["version"] == "stable"
        assert info["path"] == "/api/info?x=1"

        status, headers, body = http_get(proxy.data_url + "/hello", {"x-canary": "always"})
        assert status == 200
        assert headers["x-grayproxy-version"] == "canary"
        assert b"<h1>canary</h1>" in body and b"/hello" in body

        seen = {get_json(proxy.data_url + "/api/info", {"x-user-id": "alice"})[0] for _ in range(5)}
        assert len(seen) == 1

        # A browser without a key gets a sticky cookie, and with it, its version each time.
        status, headers, _ = http_get(proxy.data_url + "/")
        assert status == 200 and headers["set-cookie"].startswith("gp_sticky=")
        cookie = headers["set-cookie"].split(";")[0]
        first = headers["x-grayproxy-version"]
        for _ in range(10):
            status, headers, _ = http_get(proxy.data_url + "/", {"cookie": cookie})
            assert headers["x-grayproxy-version"] == first
            assert "set-cookie" not in headers

        status, _, body = http_get(proxy.control_url + "/api/v1/services/demo")
        assert status == 200
        assert json.loads(body)["versions"]["canary"]["weight"] == 10

        assert proxy.stop(signal.SIGTERM) == 0


def test_demo_on_a_busy_port_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with ProxyProcess(
            args=[*DEMO_ARGS[:2], str(port), *DEMO_ARGS[3:]], wait_ready=False
        ) as proxy:
            assert proxy.wait(timeout=30) == 1
        assert "address already in use" in proxy.stderr
        assert "Traceback" not in proxy.stderr
