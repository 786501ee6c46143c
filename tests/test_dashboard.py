"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

One grayproxy with two tokens (admin "ops", read "viewer") and two services on real
upstreams under light traffic: "web" (stable 90, canary 10) and "shop", whose release
waits for an approval at 50 %. Each test opens the page in a fresh browser context (a
new session: the token is asked again) and checks what it shows against the API.

GRAYPROXY_SCREENSHOTS=docs/img pytest tests/test_dashboard.py also saves the screenshots
docs/dashboard.md shows.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

from procs import DIRECT, ProxyProcess, http_get, tool
from servers import Upstream, decode_json

OPS, VIEWER = "ops-secret-token", "viewer-secret-token"
TOKENS = {"DASH_OPS_TOKEN": OPS, "DASH_READ_TOKEN": VIEWER}
TIMEOUT_MS = 20_000
SCREENSHOT_AFTER_MS = 90_000
CONFIG = """
listen: "127.0.0.1:${data_port}"
control:
  listen: "127.0.0.1:${control_port}"
  tokens:
    - {name: ops, token_env: DASH_OPS_TOKEN, role: admin}
    - {name: viewer, token_env: DASH_READ_TOKEN, role: read}
services:
  - name: shop
    match: {path_prefix: /shop}
    baseline: stable
    versions:
      stable: {endpoints: ["STABLE"]}
      canary: {endpoints: ["CANARY"]}
    split: {weights: {stable: 100, canary: 0}}
    release:
      canary: canary
      steps:
        - {weight: 50, approval: true}
        - {weight: 100}
      analysis:  # checks that pass whenever there is traffic, never paused for lack of it
        {interval: 1s, min_requests: 5, max_inconclusive: 1000, error_rate: {max_increase: 0.5}}
  - name: web
    baseline: stable
    versions:
      stable: {endpoints: ["STABLE"]}
      canary: {endpoints: ["CANARY"]}
    split: {weights: {stable: 90, canary: 10}}
"""


@pytest.fixture(scope="module")
def proxy(upstreams: dict[str, Upstream]) -> Iterator[ProxyProcess]:
    config = CONFIG.replace("STABLE", upstreams["stable"].address)
    config = config.replace("CANARY", upstreams["canary"].address)
    with (
        ProxyProcess(config, env=TOKENS) as proc,
        sending(proc, ("/shop/item", "/page"), pause=0.025),  # light: a few dozen a second
    ):
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = tool("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@contextmanager
def sending(proxy: ProxyProcess, paths: tuple[str, ...], pause: float) -> Iterator[None]:
    """GET each of ``paths``, then ``pause`` seconds, from a thread, until the block ends."""
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(pause):
            for path in paths:
                with suppress(OSError):
                    http_get(proxy.data_url + path)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def api(proxy: ProxyProcess, method: str, path: str, body: object = None) -> dict[str, Any]:
    """A call with the admin token, straight to the API (what the page should have done)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {OPS}", "Content-Type": "application/json"}
    request = urllib.request.Request(proxy.control_url + path, data, headers, method=method)
    with DIRECT.open(request) as response:
        return decode_json(response.read())


def weights(proxy: ProxyProcess, service: str) -> dict[str, float]:
    versions = api(proxy, "GET", f"/api/v1/services/{service}")["versions"]
    return {name: version["weight"] for name, version in versions.items()}


def open_dashboard(browser: Browser, proxy: ProxyProcess, token: str) -> Page:
    """A new browser session on the page, with ``token`` entered when it asks."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(proxy.control_url + "/")
    log_in(page, token)
    return page


def log_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def card(page: Page, service: str) -> Locator:
    return page.locator(f'section.service[data-service="{service}"]')


def row(page: Page, service: str, version: str) -> Locator:
    return card(page, service).locator(f'tr[data-version="{version}"]')


def poll(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_shows_the_services_their_versions_weights_and_live_numbers(
    browser: Browser, proxy: ProxyProcess
) -> None:
    page = open_dashboard(browser, proxy, OPS)
    expect(page.locator("#who")).to_have_text("ops (admin)")
    expect(page.locator("section.service h2 .service-name")).to_have_text(["shop", "web"])
    expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("90")
    expect(row(page, "web", "canary").locator(".weight-value")).to_have_text("10")
    expect(row(page, "web", "stable")).to_contain_text("up")  # its endpoint is healthy

    rate = row(page, "web", "stable").locator(".rate-value")
    poll(lambda: rate.inner_text() not in ("-", "0.0"))  # the light traffic, measured
    light = float(rate.inner_text())
    with sending(proxy, ("/page",), pause=0):  # as fast as one client goes: the rate rises
        poll(lambda: float(rate.inner_text()) >= 2 * light)
    assert chart_pixels(page, "web", "rate") > 0  # the history is drawn

    page.reload()  # the same session: the token is not asked again
    expect(card(page, "web")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    page.context.close()


def chart_pixels(page: Page, service: str, metric: str) -> int:
    """How many pixels of the first version's line colour the chart holds."""
    canvas = card(page, service).locator(f'canvas[data-metric="{metric}"]')
    count: int = canvas.evaluate(
        """canvas => {
            const data = canvas.getContext("2d")
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let count = 0;
            for (let i = 0; i < data.length; i += 4)
                if (data[i] < 90 && data[i + 1] < 140 && data[i + 2] > 200) count += 1;
            return count;
        }"""
    )
    return count


def test_weights_promote_and_rollback_from_the_page_move_real_traffic(
    browser: Browser, proxy: ProxyProcess
) -> None:
    page = open_dashboard(browser, proxy, OPS)
    web = card(page, "web")
    expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("90")
    set_weights_on_page(web, stable=0, canary=0)  # refused: the page shows why
    expect(web.locator(".message")).to_contain_text("HTTP 400: refused; nothing changed")
    expect(web.locator(".message li")).to_contain_text(["at least one weight must be above"])
    assert weights(proxy, "web") == {"stable": 90, "canary": 10}

    set_weights_on_page(web, stable=0, canary=100)
    expect(row(page, "web", "canary").locator(".weight-value")).to_have_text("100")
    expect(web.locator(".message")).to_be_hidden()
    try:
        assert weights(proxy, "web") == {"stable": 0, "canary": 100}
        answered = Counter(
            decode_json(http_get(proxy.data_url + f"/page/{n}")[2])["upstream"] for n in range(50)
        )
        assert answered == {"canary": 50}

        web.locator(".promote-version").select_option("stable")
        web.locator("button.promote-button").click()
        expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("100")
        assert weights(proxy, "web") == {"stable": 100, "canary": 0}
        set_weights_on_page(web, stable=0, canary=100)
        expect(row(page, "web", "canary").locator(".weight-value")).to_have_text("100")
        web.locator("button.rollback-button").click()  # to the baseline, stable
        expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("100")
        assert weights(proxy, "web") == {"stable": 100, "canary": 0}
    finally:
        api(proxy, "PUT", "/api/v1/services/web/weights", {"stable": 90, "canary": 10})
    page.context.close()


def test_a_release_is_approved_from_the_page(browser: Browser, proxy: ProxyProcess) -> None:
    page = open_dashboard(browser, proxy, OPS)
    shop = card(page, "shop")
    release = shop.locator(".release")
    expect(release.locator(".release-state")).to_have_text("waiting")
    expect(release.locator(".checks tr.check.passed").first).to_be_visible()
    approve = release.locator('button[data-command="approve"]')
    expect(approve).to_be_enabled()

    # The release holds the weights: the page shows the API's 409 and nothing changes.
    set_weights_on_page(shop, stable=0, canary=100)
    expect(shop.locator(".message")).to_contain_text("HTTP 409")
    expect(shop.locator(".message")).to_contain_text("holds the weights")
    assert weights(proxy, "shop") == {"stable": 50, "canary": 50}
    shop.locator("button.reset-weights").click()
    save_screenshots(page, release)

    release.locator('button[data-command="pause"]').click()
    expect(release.locator(".release-state")).to_have_text("paused")
    expect(release.locator('button[data-command="pause"]')).to_be_disabled()
    release.locator('button[data-command="resume"]').click()
    expect(release.locator(".release-state")).to_have_text("waiting")
    approve.click()
    expect(release.locator(".release-state")).to_have_text("promoted")
    assert api(proxy, "GET", "/api/v1/services/shop/release")["state"] == "promoted"
    assert weights(proxy, "shop") == {"stable": 0, "canary": 100}
    expect(approve).to_be_disabled()

    # Another release; "force" on the page aborts it and the weights apply.
    steps = [{"weight": 50, "approval": True}, {"weight": 100}]
    api(proxy, "POST", "/api/v1/services/shop/release", {"canary": "canary", "steps": steps})
    expect(release.locator(".release-state")).to_have_text("waiting")
    set_weights_on_page(shop, stable=100, canary=0, force=True)
    expect(release.locator(".release-state")).to_have_text("aborted")
    expect(shop.locator(".message")).to_be_hidden()
    assert weights(proxy, "shop") == {"stable": 100, "canary": 0}
    page.context.close()


def set_weights_on_page(service: Locator, *, stable: int, canary: int, force: bool = False) -> None:
    service.locator('input[name="stable"]').fill(str(stable))
    service.locator('input[name="canary"]').fill(str(canary))
    service.locator(".force-box").set_checked(force)
    service.locator("button.set-weights").click()


def save_screenshots(page: Page, release: Locator) -> None:
    """With GRAYPROXY_SCREENSHOTS=DIR: the page and the release panel, for the docs."""
    directory = os.environ.get("GRAYPROXY_SCREENSHOTS")
    if directory:
        page.wait_for_timeout(SCREENSHOT_AFTER_MS)  # charts with some history
        page.screenshot(path=str(Path(directory) / "dashboard.png"), full_page=True)
        release.screenshot(path=str(Path(directory) / "dashboard-release.png"))


def test_a_read_token_sees_everything_and_changes_nothing(
    browser: Browser, proxy: ProxyProcess
) -> None:
    page = open_dashboard(browser, proxy, VIEWER)
    expect(page.locator("#who")).to_have_text("viewer (read)")
    expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("90")
    expect(card(page, "shop").locator(".release-state")).not_to_be_empty()
    expect(card(page, "web").locator(".readonly-note")).to_be_visible()
    controls = page.locator("section.service").locator("button, input, select")
    assert controls.count() > 10
    for index in range(controls.count()):
        expect(controls.nth(index)).to_be_disabled()

    forced = page.evaluate(
        """token => fetch("/api/v1/services/web/weights?force=true", {
            method: "PUT",
            headers: {Authorization: "Bearer " + token, "Content-Type": "application/json"},
            body: JSON.stringify({stable: 0, canary: 100}),
        }).then(async response => [response.status, await response.json()])""",
        VIEWER,
    )
    assert forced[0] == 403
    assert "admin token" in forced[1]["error"]
    assert weights(proxy, "web") == {"stable": 90, "canary": 10}
    page.context.close()


def test_a_wrong_token_is_told_and_changes_nothing(browser: Browser, proxy: ProxyProcess) -> None:
    generation = api(proxy, "GET", "/api/v1/services")["generation"]
    page = open_dashboard(browser, proxy, "not-the-token")
    message = page.locator("#login-message")
    expect(message).to_be_visible()
    expect(message).to_contain_text("refused")
    expect(message).to_contain_text("401")
    assert page.locator("section.service").count() == 0
    assert page.evaluate("sessionStorage.length") == 0  # the wrong token is not kept
    assert api(proxy, "GET", "/api/v1/services")["generation"] == generation

    log_in(page, OPS)  # entered again, right this time
    expect(card(page, "web")).to_be_visible()
    expect(message).to_be_hidden()
    page.context.close()


def test_the_page_is_locked_down_and_works_offline(browser: Browser, proxy: ProxyProcess) -> None:
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
        status, headers, _ = http_get(proxy.control_url + path)
        assert status == 200
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"

    context = browser.new_context()
    elsewhere: list[str] = []

    def only_loopback(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)
    page.goto(proxy.control_url + "/")
    log_in(page, OPS)
    expect(card(page, "web")).to_be_visible()
    expect(row(page, "web", "stable").locator(".weight-value")).to_have_text("90")
    assert elsewhere == []
    assert refused == []  # nothing the page does is blocked by its own policy
    context.close()


def test_without_tokens_nothing_is_asked_and_data_stays_text(
    browser: Browser, upstreams: dict[str, Upstream]
) -> None:
    markup = "/<img/src=x/onerror=alert(1)>"  # a valid path prefix, and valid HTML
    config = f"""
listen: "127.0.0.1:${{data_port}}"
control: {{listen: "127.0.0.1:${{control_port}}"}}
services:
  - name: odd
    match: {{path_prefix: "{markup}"}}
    baseline: stable
    versions:
      stable: {{endpoints: ["{upstreams["stable"].address}"]}}
"""
    with ProxyProcess(config) as proc:
        page = browser.new_context().new_page()
        page.set_default_timeout(TIMEOUT_MS)
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        page.goto(proc.control_url + "/")
        expect(page.locator("#who")).to_have_text("no token needed")
        odd = card(page, "odd")
        expect(odd.locator(".service-match")).to_contain_text(markup)
        expect(page.locator("#login")).to_be_hidden()
        assert page.locator("img").count() == 0
        assert dialogs == []
        page.context.close()
