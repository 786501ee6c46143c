"""Change safety: ETag / If-Match, named tokens with roles, the audit trail, the state file.

Real grayproxy processes on free ports for the API's behaviour and for restarts
(including ``kill -9``); plain data for the pure parts (audit, state file
encoding and restore decisions, the config's token and state_file errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit import MAX_RECORDS, AuditLog, AuditRecord, now_text, parse_limit
from proxy.config import ConfigError
from proxy.control import create_app
from proxy.loader import node_digest, parse_config
from proxy.metrics import Metrics
from proxy.state import IF_MATCH, LiveState, Precondition, PreconditionFailed
from proxy.statefile import (
    SavedService,
    SavedState,
    StateFileError,
    decode,
    encode,
    read,
    restore_weights,
    write_atomically,
)

from procs import DIRECT, ProxyProcess, http_get
from servers import Upstream

OPS = "ops-s3cret"
READER = "read-s3cret"
TOKENS = {"GP_OPS_TOKEN": OPS, "GP_READ_TOKEN": READER}

CONFIG = """\
listen: "127.0.0.1:${data_port}"
workers: %(workers)d
control:
  listen: "127.0.0.1:${control_port}"
  tokens:
    - {name: ops, token_env: GP_OPS_TOKEN, role: admin}
    - {name: grafana, token_env: GP_READ_TOKEN, role: read}
state_file: %(state_file)s
services:
  - name: web
    baseline: stable
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split: {weights: {stable: 90, canary: 10}, salt: %(salt)s}
  - name: api
    versions:
      blue: {endpoints: ["127.0.0.1:11"]}
      green: {endpoints: ["127.0.0.1:12"]}
"""


def config(
    state_file: Path,
    *,
    salt: str = "release-1",
    workers: int = 1,
    stable: str = "127.0.0.1:9",
    canary: str = "127.0.0.1:10",
) -> str:
    values = {
        "state_file": state_file,
        "salt": salt,
        "workers": workers,
        "stable": stable,
        "canary": canary,
    }
    return CONFIG % values


def plain(state_file: Path | None = None) -> str:
    """The same services without tokens or port placeholders, for in-process tests."""
    text = config(state_file or Path("/tmp/state.json"))
    text = text.replace("${data_port}", "18080").replace("${control_port}", "19901")
    text = re.sub(r"  tokens:\n(    - .*\n)+", "", text)
    return text if state_file else text.replace("state_file: /tmp/state.json\n", "")


def start(text: str) -> ProxyProcess:
    return ProxyProcess(text, env=TOKENS).__enter__()


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = {name.lower(): value for name, value in headers.items()}
        self.json: Any = json.loads(body) if body else None

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


def call(
    proxy: ProxyProcess,
    method: str,
    path: str,
    body: object = None,
    *,
    token: str | None = OPS,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(proxy.control_url + path, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with DIRECT.open(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, dict(exc.headers.items()), exc.read())


def weights(proxy: ProxyProcess, service: str = "web") -> dict[str, float]:
    answer = call(proxy, "GET", f"/api/v1/services/{service}")
    assert answer.status == 200, answer.json
    return {name: version["weight"] for name, version in answer.json["versions"].items()}


def generation(proxy: ProxyProcess) -> int:
    answer = call(proxy, "GET", "/api/v1/services")
    assert answer.status == 200
    assert answer.etag == f'"{answer.json["generation"]}"'
    return int(answer.json["generation"])


def audit(proxy: ProxyProcess, query: str = "") -> list[dict[str, Any]]:
    answer = call(proxy, "GET", f"/api/v1/audit{query}")
    assert answer.status == 200, answer.json
    return list(answer.json["records"])


def audit_lines(output: str) -> list[dict[str, Any]]:
    """The JSON audit records the process logged (logger grayproxy.audit)."""
    return [
        json.loads(line.split("grayproxy.audit: ", 1)[1])
        for line in output.splitlines()
        if "grayproxy.audit: " in line
    ]


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state.json"


@pytest.fixture
def proxy(state_file: Path) -> Iterator[ProxyProcess]:
    with ProxyProcess(config(state_file), env=TOKENS) as proc:
        yield proc


# ------------------------------------------------------------------ ETag and If-Match


def test_reads_carry_the_generation_as_a_strong_etag(proxy: ProxyProcess) -> None:
    for path in ("/api/v1/services", "/api/v1/services/web", "/api/v1/audit"):
        answer = call(proxy, "GET", path)
        assert answer.status == 200
        assert answer.etag == '"1"', path
    changed = call(proxy, "PUT", "/api/v1/services/web/weights", {"stable": 50, "canary": 50})
    assert changed.status == 200
    assert changed.etag == '"2"' and changed.json["generation"] == 2
    assert call(proxy, "GET", "/api/v1/services/api").etag == '"2"'


def test_a_stale_if_match_is_412_and_changes_nothing(proxy: ProxyProcess) -> None:
    stale = call(proxy, "GET", "/api/v1/services/web").etag
    assert call(proxy, "POST", "/api/v1/services/web/promote", {"version": "canary"}).status == 200
    before = call(proxy, "GET", "/api/v1/services/web").json
    records = audit(proxy)
    assert stale is not None
    refusals = [
        ("PUT", "/api/v1/services/web/weights", {"stable": 1, "canary": 99}),
        ("POST", "/api/v1/services/web/promote", {"version": "stable"}),
        ("POST", "/api/v1/services/web/rollback", {}),
        ("POST", "/api/v1/reload", {}),
    ]
    for method, path, body in refusals:
        for condition in (stale, f'W/"{before["generation"]}"', '"nope"', f'{stale}, "99"'):
            answer = call(proxy, method, path, body, headers={"If-Match": condition})
            assert answer.status == 412, (path, condition, answer.json)
            assert answer.json["generation"] == before["generation"]
            assert str(before["generation"]) in answer.json["error"]
            assert answer.etag == f'"{before["generation"]}"'
    after = call(proxy, "GET", "/api/v1/services/web").json
    assert {n: v["weight"] for n, v in after["versions"].items()} == {"stable": 0, "canary": 100}
    assert after["generation"] == before["generation"]
    assert audit(proxy) == records


def test_a_matching_if_match_applies(proxy: ProxyProcess) -> None:
    etag = call(proxy, "GET", "/api/v1/services/web").etag
    assert etag == '"1"'
    changed = call(
        proxy, "PUT", "/api/v1/services/web/weights", {"stable": 70, "canary": 30},
        headers={"If-Match": f'"7", {etag}'},
    )  # fmt: skip
    assert changed.status == 200 and changed.etag == '"2"'
    assert weights(proxy) == {"stable": 70, "canary": 30}
    for condition in ("*", "3"):  # any generation; a bare number is taken as "3"
        answer = call(proxy, "POST", "/api/v1/services/web/rollback", {},
                      headers={"If-Match": condition})  # fmt: skip
        assert answer.status == 200, answer.json
    assert generation(proxy) == 4
    reloaded = call(proxy, "POST", "/api/v1/reload", {}, headers={"If-Match": '"4"'})
    assert reloaded.status == 200 and reloaded.json["generation"] == 5


def test_a_malformed_if_match_is_400(proxy: ProxyProcess) -> None:
    answer = call(proxy, "POST", "/api/v1/services/web/rollback", {}, headers={"If-Match": "abc"})
    assert answer.status == 400
    assert "If-Match" in answer.json["error"]
    assert generation(proxy) == 1


def test_if_match_makes_concurrent_read_modify_write_lose_no_update(proxy: ProxyProcess) -> None:
    """Eight clients each add 1 to stable's weight ten times: read, then write under
    If-Match, again on 412. Every increment lands exactly once."""
    clients, rounds = 8, 10

    def increment() -> None:
        for _ in range(rounds):
            while True:
                read = call(proxy, "GET", "/api/v1/services/web")
                assert read.etag is not None
                stable = read.json["versions"]["stable"]["weight"]
                body = {"stable": stable + 1, "canary": 10}
                answer = call(proxy, "PUT", "/api/v1/services/web/weights", body,
                              headers={"If-Match": read.etag})  # fmt: skip
                if answer.status == 200:
                    break
                assert answer.status == 412, answer.json

    threads = [threading.Thread(target=increment) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert weights(proxy) == {"stable": 90 + clients * rounds, "canary": 10}
    assert generation(proxy) == 1 + clients * rounds


def test_the_if_match_is_checked_when_the_change_applies_not_when_it_was_asked(
    tmp_path: Path,
) -> None:
    """A reload parses in a thread: a weight change that lands meanwhile makes a reload
    asked under the older generation fail, and the reload changes nothing."""
    path = tmp_path / "grayproxy.yaml"
    path.write_text(plain())
    from proxy.loader import load_config

    async def main() -> None:
        state = LiveState(load_config(str(path)), str(path))
        IF_MATCH.set(Precondition('"1"', frozenset({1})))
        reload = asyncio.get_running_loop().create_task(state.reload(actor="ops"))
        await asyncio.sleep(0)  # the reload is parsing in its thread now
        IF_MATCH.set(None)
        state.set_weights("web", {"stable": 1, "canary": 1}, actor="ops")
        with pytest.raises(PreconditionFailed) as failed:
            await reload
        assert failed.value.generation == 2
        assert state.snapshot.generation == 2
        assert dict(state.service("web").split.weights) == {"stable": 1.0, "canary": 1.0}
        assert [record.action for record in state.audit.records()] == ["weights"]

    asyncio.run(main())


def test_a_precondition_guards_the_first_change_of_its_request_only(tmp_path: Path) -> None:
    state = LiveState(parse_config(plain()), None)
    context = IF_MATCH.set(Precondition('"1"', frozenset({1})))
    try:
        state.record("release-abort", "web", {"state": "progressing"}, {"state": "aborted"}, "ops")
        state.set_weights("web", {"stable": 100}, actor="ops")  # the same request's next change
    finally:
        IF_MATCH.reset(context)
    assert state.snapshot.generation == 3
    context = IF_MATCH.set(Precondition('"1"', frozenset({1})))
    try:
        with pytest.raises(PreconditionFailed):
            state.rollback("web", actor="ops")
    finally:
        IF_MATCH.reset(context)
    assert state.snapshot.generation == 3


def test_work_a_request_starts_in_the_background_is_not_held_to_its_if_match() -> None:
    async def main() -> None:
        state = LiveState(parse_config(plain()), None)
        stale = Precondition('"5"', frozenset({5}), task=asyncio.current_task())
        IF_MATCH.set(stale)

        async def release_step() -> None:  # e.g. a release driver the request started
            state.record("release-step", "web", {"step": 0}, {"step": 1}, "release")

        await asyncio.get_running_loop().create_task(release_step())
        assert state.snapshot.generation == 2
        with pytest.raises(PreconditionFailed):
            state.rollback("web", actor="ops")  # the request's own change is checked
        assert state.snapshot.generation == 2

    asyncio.run(main())


# ------------------------------------------------------------------ tokens and roles


def api_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the control app under /api/, with {name} = web: taken from
    the app's router, so that routes added later are covered too."""
    state = LiveState(parse_config(plain()), None)
    app = create_app(state, Metrics(), endpoint_health=lambda *_: True, is_ready=lambda: True)
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/api/") and route.method != "HEAD":
            filled = re.sub(r"\{name\}", "web", path)
            routes.add((route.method, re.sub(r"\{[^}]+\}", "x", filled)))
    return sorted(routes)


def test_the_router_has_the_documented_routes() -> None:
    routes = api_routes()
    for expected in [
        ("GET", "/api/v1/services"),
        ("GET", "/api/v1/services/web"),
        ("GET", "/api/v1/audit"),
        ("PUT", "/api/v1/services/web/weights"),
        ("POST", "/api/v1/services/web/promote"),
        ("POST", "/api/v1/services/web/rollback"),
        ("POST", "/api/v1/reload"),
    ]:
        assert expected in routes


def test_a_read_token_reads_and_is_refused_every_change(proxy: ProxyProcess) -> None:
    bodies: dict[str, object] = {"weights": {"stable": 1}, "promote": {"version": "canary"}}
    for method, path in api_routes():
        answer = call(proxy, method, path, bodies.get(path.rsplit("/", 1)[-1], {}), token=READER)
        if method == "GET" or path.endswith("/explain"):  # explain changes nothing
            assert answer.status not in (401, 403), (method, path)
            assert answer.status < 500, (method, path, answer.json)
        else:
            assert answer.status == 403, (method, path, answer.status)
            assert "grafana" in answer.json["details"][0]
    for path in ("/api/v1/services", "/api/v1/services/web", "/api/v1/audit"):
        assert call(proxy, "GET", path, token=READER).status == 200
    assert generation(proxy) == 1
    assert audit(proxy) == []


def test_a_wrong_or_missing_token_is_401_everywhere_under_api(proxy: ProxyProcess) -> None:
    for method, path in [*api_routes(), ("GET", "/api/v1/nowhere")]:
        for token in (None, "wrong", OPS + "x", OPS[:-1]):
            answer = call(proxy, method, path, {}, token=token)
            assert answer.status == 401, (method, path, token)
            assert answer.headers["www-authenticate"] == "Bearer"
    assert http_get(proxy.control_url + "/healthz")[0] == 200
    assert http_get(proxy.control_url + "/metrics")[0] == 200
    assert generation(proxy) == 1


# ------------------------------------------------------------------ audit


def test_every_applied_change_is_audited_with_its_actor(proxy: ProxyProcess) -> None:
    call(proxy, "PUT", "/api/v1/services/web/weights", {"stable": 80, "canary": 20})
    call(proxy, "POST", "/api/v1/services/api/promote", {"version": "green"})
    call(proxy, "PUT", "/api/v1/services/web/weights", {"stable": -1})  # refused: not audited
    call(proxy, "POST", "/api/v1/services/web/rollback", {})
    call(proxy, "POST", "/api/v1/reload", {})
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: generation(proxy) == 6)

    records = audit(proxy)
    assert [(r["generation"], r["actor"], r["action"], r["service"]) for r in records] == [
        (6, "signal", "reload", None),
        (5, "ops", "reload", None),
        (4, "ops", "rollback", "web"),
        (3, "ops", "promote", "api"),
        (2, "ops", "weights", "web"),
    ]
    weights_record = records[-1]
    assert weights_record["before"] == {"stable": 90, "canary": 10}
    assert weights_record["after"] == {"stable": 80, "canary": 20}
    assert records[2]["before"] == {"stable": 80, "canary": 20}
    assert records[2]["after"] == {"stable": 100, "canary": 0}
    assert records[1]["before"] == {"generation": 4}
    assert records[1]["after"]["generation"] == 5
    assert records[1]["after"]["changed"] == ["web", "api"]  # back to the file's weights
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])

    assert [r["generation"] for r in audit(proxy, "?limit=2")] == [6, 5]
    assert [r["generation"] for r in audit(proxy, "?service=web")] == [4, 2]
    assert [r["generation"] for r in audit(proxy, "?service=web&limit=1")] == [4]
    assert audit(proxy, "?service=nope") == []
    for bad in ("0", "-1", "abc", "1001", "1e3", "9" * 5000):
        answer = call(proxy, "GET", f"/api/v1/audit?limit={bad}")
        assert answer.status == 400, bad
        assert "limit" in answer.json["details"][0]

    # The same records, as JSON lines in the log.
    wait_for(lambda: len(audit_lines(proxy.stderr)) == 5)
    assert audit_lines(proxy.stderr) == list(reversed(records))


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# ------------------------------------------------------------------ state file across restarts


def test_kill_9_then_restart_keeps_weights_generation_and_audit(state_file: Path) -> None:
    text = config(state_file)
    first = start(text)
    try:
        call(first, "PUT", "/api/v1/services/web/weights", {"stable": 30, "canary": 70})
        call(first, "POST", "/api/v1/services/api/promote", {"version": "green"})
        last = call(first, "PUT", "/api/v1/services/web/weights", {"stable": 25, "canary": 75})
        assert last.etag == '"4"'
        records = audit(first)
        first.stop(signal.SIGKILL)
    finally:
        first.close()

    second = start(text)
    try:
        assert weights(second) == {"stable": 25, "canary": 75}
        assert weights(second, "api") == {"blue": 0, "green": 100}
        assert generation(second) == 5  # one more than the file's: never shown before
        restart = audit(second)[0]
        assert (restart["actor"], restart["action"]) == ("file", "restart")
        assert restart["generation"] == 5
        assert restart["after"]["restored"] == ["web", "api"]
        assert audit(second)[1:] == records
        changed = call(second, "POST", "/api/v1/services/web/rollback", {})
        assert changed.etag == '"6"'
        assert "restored generation 4" in second.stderr
    finally:
        second.close()
    assert sorted(os.listdir(state_file.parent)) == ["state.json"]


def test_a_service_changed_in_the_config_file_meanwhile_takes_the_files_weights(
    state_file: Path,
) -> None:
    with ProxyProcess(config(state_file), env=TOKENS) as first:
        call(first, "PUT", "/api/v1/services/web/weights", {"stable": 10, "canary": 90})
        call(first, "PUT", "/api/v1/services/api/weights", {"blue": 40, "green": 60})
    with ProxyProcess(config(state_file, salt="release-2"), env=TOKENS) as second:
        assert weights(second) == {"stable": 90, "canary": 10}  # the file's
        assert weights(second, "api") == {"blue": 40, "green": 60}  # unchanged: restored
        assert generation(second) == 4
        restart = audit(second)[0]
        assert restart["after"]["config_file_wins"] == ["web"]
        assert restart["after"]["restored"] == ["api"]
        assert re.search(
            r"WARNING .*state file .*state\.json: services\.web: changed in the config file "
            r"since the state was saved; the config file's weights apply",
            second.stderr,
        ), second.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "not valid JSON, truncated or corrupt"),  # None: a real file cut in half
        (b"\x00\xff\xfe garbage \x81", "not UTF-8 text"),
        (b"", "empty"),
        (b'{"format": 1, "generation": "7", "services": {}}', "generation '7'"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"format": 99, "generation": 3}', "format 99"),
    ],
)
def test_an_unusable_state_file_is_logged_and_the_config_file_applies(
    state_file: Path, content: bytes | None, problem: str
) -> None:
    with ProxyProcess(config(state_file), env=TOKENS) as first:
        call(first, "PUT", "/api/v1/services/web/weights", {"stable": 1, "canary": 99})
    whole = state_file.read_bytes()
    state_file.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with ProxyProcess(config(state_file), env=TOKENS) as second:
        assert weights(second) == {"stable": 90, "canary": 10}
        assert generation(second) == 1
        line = next(line for line in second.stderr.splitlines() if "cannot be used" in line)
        assert f"state file {state_file}: cannot be used: " in line
        assert problem in line
        assert "starting from the config file's state" in line
        assert "Traceback" not in second.output
        # The next change writes a good file over it.
        call(second, "POST", "/api/v1/services/web/promote", {"version": "canary"})
    saved = read(str(state_file))
    assert saved is not None and saved.generation == 2


def test_kill_9_at_random_moments_never_leaves_a_broken_or_stale_file(state_file: Path) -> None:
    """A stream of changes, kill -9 at a random moment, five times over: the file always
    parses, and holds at least every change whose answer arrived (answers wait for it)."""
    text = config(state_file)
    moments = random.Random(1307)
    acknowledged: list[int] = [0]  # the newest generation whose answer arrived
    for round_number in range(5):
        proc = start(text)
        writer = threading.Thread(target=change_weights, args=(proc, round_number, acknowledged))
        writer.start()
        time.sleep(moments.uniform(0.05, 0.5))
        proc.stop(signal.SIGKILL)
        writer.join(20)
        proc.close()
        saved = decode(state_file.read_bytes())  # raises if broken
        assert saved.generation >= acknowledged[0] > 0
    with ProxyProcess(text, env=TOKENS) as last:
        assert generation(last) == saved.generation + 1
        assert weights(last) == {
            name: int(weight) for name, weight in saved.services["web"].weights.items()
        }
    assert sorted(os.listdir(state_file.parent)) == ["state.json"]


def change_weights(proc: ProxyProcess, seed: int, acknowledged: list[int]) -> None:
    """Random weight changes, one after the other, until the proxy is gone."""
    bodies = random.Random(seed)
    while True:
        body = {"stable": bodies.randint(1, 99), "canary": bodies.randint(1, 99)}
        try:
            answer = call(proc, "PUT", "/api/v1/services/web/weights", body)
        except (OSError, http.client.HTTPException):
            return  # killed
        assert answer.status == 200 and answer.etag is not None
        acknowledged[0] = max(acknowledged[0], int(answer.etag.strip('"')))


def test_with_workers_the_supervisor_restores_and_the_data_path_follows(
    state_file: Path, upstreams: dict[str, Upstream]
) -> None:
    text = config(
        state_file,
        workers=2,
        stable=upstreams["stable"].address,
        canary=upstreams["canary"].address,
    )
    with ProxyProcess(text, env=TOKENS) as first:
        call(first, "PUT", "/api/v1/services/web/weights", {"stable": 0, "canary": 100})
        assert first.stop(signal.SIGTERM) == 0
    with ProxyProcess(text, env=TOKENS) as second:
        assert weights(second) == {"stable": 0, "canary": 100}
        for _ in range(10):
            status, _, body = http_get(second.data_url + "/who")
            assert status == 200 and json.loads(body)["upstream"] == "canary"
        assert second.stderr.count("restored generation") == 1


# ------------------------------------------------------------------ the config file


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    return refused.value.errors


SERVICES = """\
services:
  - name: web
    versions: {v1: {endpoints: ["127.0.0.1:9"]}}
"""


def test_token_config_errors_are_listed_with_their_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GP_A", "aaa")
    monkeypatch.setenv("GP_SAME", "aaa")
    monkeypatch.setenv("GP_BLANK", "   ")
    monkeypatch.delenv("GP_MISSING", raising=False)
    (tmp_path / "empty").write_text("\n")
    errors = config_errors(f"""\
control:
  tokens:
    - {{name: ops, token_env: GP_A, role: admin}}
    - {{name: ops, token_env: GP_MISSING, role: read}}
    - {{name: viewer, token_env: GP_A, token_file: x, role: read}}
    - {{name: bad, token_env: GP_BLANK, role: root}}
    - {{name: same, token_env: GP_SAME, role: read}}
    - {{name: release, token_file: {tmp_path / "nowhere"}, role: admin}}
    - {{name: file, token_file: {tmp_path / "empty"}, role: read}}
    - {{name: "with space", role: admin}}
    - {{token_env: GP_A}}
{SERVICES}""")
    assert errors == [
        "control.tokens[1].name: line 4: duplicate token name 'ops' (first at line 3)",
        "control.tokens[1].token_env: line 4: environment variable GP_MISSING is not set",
        "control.tokens[2]: line 5: set token_env or token_file, not both",
        "control.tokens[3].role: line 6: 'root': expected one of: admin, read",
        "control.tokens[3].token_env: line 6: environment variable GP_BLANK is empty",
        "control.tokens[4]: line 7: the same secret as control.tokens[0]; every token must differ",
        "control.tokens[5].name: line 8: 'release' is reserved (the actor of changes no token "
        "makes)",
        f"control.tokens[5].token_file: line 8: cannot read {tmp_path / 'nowhere'}: "
        "No such file or directory",
        "control.tokens[6].name: line 9: 'file' is reserved (the actor of changes no token makes)",
        f"control.tokens[6].token_file: line 9: token file {tmp_path / 'empty'} is empty",
        "control.tokens[7].name: line 10: 'with space': token names may only contain A-Z, a-z, "
        "0-9, '_', '.' and '-'",
        "control.tokens[7]: line 10: needs token_env or token_file",
        "control.tokens[8].name: line 11: required",
        "control.tokens[8].role: line 11: required",
    ]


def test_tokens_and_a_lone_token_together_or_an_empty_list_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GP_A", "aaa")
    assert config_errors(f"""\
control:
  token_env: GP_A
  tokens: [{{name: ops, token_env: GP_A, role: admin}}]
{SERVICES}""") == [
        "control.tokens: line 3: set tokens, or token_env / token_file (one admin token), not both"
    ]
    assert config_errors(f"control: {{tokens: []}}\n{SERVICES}") == [
        "control.tokens: line 1: at least one token is required"
    ]
    assert config_errors(f'control: {{listen: "0.0.0.0:9901"}}\n{SERVICES}') == [
        "control.listen: line 1: a non-loopback control listener needs control.token_env or "
        "token_file"
    ]


def test_named_tokens_and_the_lone_token_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GP_A", "aaa")
    monkeypatch.setenv("GP_B", " bbb\n")
    loaded = parse_config(f"""\
control:
  listen: "0.0.0.0:9901"
  tokens:
    - {{name: ops, token_env: GP_A, role: admin}}
    - {{name: grafana, token_env: GP_B, role: read}}
{SERVICES}""")
    tokens = [(t.name, t.secret, t.role) for t in loaded.control.tokens]
    assert tokens == [("ops", "aaa", "admin"), ("grafana", "bbb", "read")]
    assert "aaa" not in repr(loaded.control.tokens)
    lone = parse_config(f"control: {{token_env: GP_A}}\n{SERVICES}")
    assert [(t.name, t.secret, t.role) for t in lone.control.tokens] == [("admin", "aaa", "admin")]
    assert parse_config(SERVICES).control.tokens == ()


def test_the_team_example_has_an_admin_and_a_read_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.loader import load_config

    monkeypatch.setenv("GRAYPROXY_TOKEN", "t-admin")
    monkeypatch.setenv("GRAYPROXY_READ_TOKEN", "t-read")
    example = Path(__file__).resolve().parent.parent / "config" / "team.yaml"
    tokens = load_config(str(example)).control.tokens
    assert [(t.name, t.role) for t in tokens] == [("ops", "admin"), ("grafana", "read")]


def test_state_file_errors_are_listed_with_their_lines(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    for value, problem in [
        (f"{tmp_path}/missing/state.json", f"the directory {tmp_path}/missing does not exist"),
        (f"{tmp_path}/a-directory", f"{tmp_path}/a-directory is a directory"),
        ('""', "must not be empty"),
        ("[1]", "expected a string, got a list"),
    ]:
        assert config_errors(f"listen: '127.0.0.1:8080'\nstate_file: {value}\n{SERVICES}") == [
            f"state_file: line 2: {problem}"
        ]


def test_a_relative_state_file_is_next_to_the_config_file(tmp_path: Path) -> None:
    from proxy.loader import load_config

    path = tmp_path / "grayproxy.yaml"
    path.write_text(f"state_file: state.json\n{SERVICES}")
    assert load_config(str(path)).state_file == str(tmp_path / "state.json")


def test_the_service_digest_follows_what_the_file_says_not_how() -> None:
    def digest(text: str) -> str:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        assert node is not None
        return node_digest(node)

    plain = digest("name: web\nsplit: {weights: {a: 1, b: 2}}\n")
    assert plain == digest("# a comment\nsplit:\n  weights:\n    b: 2\n    a: 1\nname: 'web'\n")
    assert plain != digest("name: web\nsplit: {weights: {a: 1, b: 3}}\n")
    assert plain != digest("name: web\nsplit: {weights: {a: '1', b: 2}}\n")
    assert plain != digest("name: web\nsplit: {weights: [a, 1, b, 2]}\n")
    bomb = "a: &a [x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20)
    )
    assert len(digest(bomb)) == 64  # shared nodes are digested once, not 2**20 times


# ------------------------------------------------------------------ plain data: audit, state file


def record(generation: int, service: str | None = "web") -> AuditRecord:
    return AuditRecord(generation, now_text(), "ops", "weights", service, {"a": 1}, {"a": 2})


def test_the_audit_log_keeps_the_last_records_newest_first() -> None:
    log = AuditLog()
    for generation in range(1, MAX_RECORDS + 51):
        log.add(record(generation, "web" if generation % 2 else "api"))
    assert len(log) == MAX_RECORDS
    assert log.records()[0].generation == 51
    assert [r.generation for r in log.newest(3)] == [1050, 1049, 1048]
    assert [r.generation for r in log.newest(2, "web")] == [1049, 1047]
    assert log.newest(5, "nope") == []
    log.restore([record(1)])
    assert log.records()[-1].generation == 1050 and len(log) == MAX_RECORDS


def test_parse_limit() -> None:
    assert parse_limit(None) == 100
    assert parse_limit("1") == 1
    assert parse_limit(str(MAX_RECORDS)) == MAX_RECORDS
    for bad in ("0", "1001", "-5", "x", "1.5", "", "٣"):
        with pytest.raises(ValueError, match="limit"):
            parse_limit(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
weights_maps = st.dictionaries(
    st.text(min_size=1, max_size=4), st.floats(0, 1000, allow_nan=False), max_size=3
)
saved_states = st.builds(
    SavedState,
    generation=st.integers(1, 2**40),
    services=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.builds(SavedService, digest=st.text(max_size=8), weights=weights_maps),
        max_size=3,
    ),
    audit=st.lists(
        st.builds(
            AuditRecord,
            generation=st.integers(1, 2**40),
            time=st.just("2026-11-02T14:03:07.512Z"),
            actor=st.text(max_size=5),
            action=st.text(max_size=5),
            service=st.none() | st.text(max_size=5),
            before=json_values,
            after=json_values,
        ),
        max_size=4,
    ).map(tuple),
    sections=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(saved_states)
def test_a_state_file_reads_back_as_written(state: SavedState) -> None:
    assert decode(encode(state)) == state


@settings(max_examples=150, deadline=None)
@given(saved_states, st.data())
def test_a_cut_or_damaged_state_file_is_refused_with_a_reason(
    state: SavedState, data: st.DataObject
) -> None:
    encoded = encode(state)
    cut = data.draw(st.integers(0, len(encoded) - 3))  # short of the closing "}\n"
    with pytest.raises(StateFileError):
        decode(encoded[:cut])
    noise = data.draw(st.binary(max_size=64))
    with contextlib.suppress(StateFileError):  # anything else (a traceback at start) fails
        decode(noise)


def test_restore_weights_keeps_saved_weights_only_for_unchanged_services() -> None:
    services = parse_config(f"""\
{SERVICES}  - name: api
    versions: {{blue: {{endpoints: ["127.0.0.1:1"]}}, green: {{endpoints: ["127.0.0.1:2"]}}}}
  - name: new
    versions: {{v1: {{endpoints: ["127.0.0.1:3"]}}}}
""").services
    web, api, new = services
    saved = {
        "web": SavedService("another digest", {"v1": 5.0}),
        "api": SavedService(api.source_digest, {"blue": 0.0, "green": 7.0}),
        "gone": SavedService("x", {"v1": 1.0}),
    }
    restored = restore_weights(services, saved)
    assert restored.kept == ("api",)
    assert restored.config_wins == ("web",)
    assert restored.services[0] is web and restored.services[2] is new
    assert dict(restored.services[1].split.weights) == {"blue": 0.0, "green": 7.0}
    unfit = restore_weights(services, {"api": SavedService(api.source_digest, {"red": 1.0})})
    assert unfit.config_wins == ("api",) and "saved weights refused" in unfit.messages[0]


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    write_atomically(path, b"one")
    write_atomically(path, b"two")
    assert Path(path).read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["state.json"]
    assert read(str(tmp_path / "missing.json")) is None


def test_sections_of_other_modules_are_written_and_restored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    first = LiveState(parse_config(plain(path)), None)
    first.attach_state_file(str(path))
    progress = {"web": {"step": 2}}
    first.add_persisted("releases", lambda: progress)
    first.record("release-step", "web", {"step": 1}, {"step": 2}, "release")
    second = LiveState(parse_config(plain(path)), None)
    second.attach_state_file(str(path))
    assert second.restored("releases") == {"web": {"step": 2}}
    assert second.restored("other") is None
    assert second.snapshot.generation == 3
    assert [r.action for r in second.audit.records()] == ["release-step", "restart"]
