"""Fleets: one `grayproxy ctl` call to every replica (docs/fleets.md).

``--url`` names the replicas: control URLs separated by commas (``host:port`` alone works),
and ``dns+http://NAME:PORT`` (or ``dns+https://``) for every address NAME resolves to, as a
Kubernetes headless Service gives. Everything is resolved before anything is sent: a name
that does not resolve changes nothing anywhere.

A change goes to every replica at once (a thread each): the replica's generation is read
(the ETag of ``GET /api/v1/services``), then the change is sent with ``If-Match`` of it, so
a replica changed in between answers 412 and is reported as failed, never overwritten.
A read is shown per replica, followed by what the replicas disagree on.
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from proxy.ctl import ControlCallFailed, ControlClient, Json, services_of

DNS_SCHEMES = ("dns+http://", "dns+https://")
Lookup = Callable[..., Sequence[tuple[Any, ...]]]
Call = Callable[[ControlClient, argparse.Namespace], Json]


@dataclass(frozen=True, slots=True)
class Targets:
    urls: tuple[str, ...]  # control URLs, one per replica, without duplicates
    fleet: bool  # several replicas, or a name: answers are shown per replica


def resolve(option: str, lookup: Lookup = socket.getaddrinfo) -> Targets:
    """The replicas that ``--url`` names; ControlCallFailed for a bad URL or a name that
    does not resolve."""
    parts = [part.strip() for part in option.split(",")]
    if not all(parts):
        raise ControlCallFailed(f"--url {option!r}: an empty URL in the list")
    urls: list[str] = []
    for part in parts:
        if part.startswith(DNS_SCHEMES):
            urls += _addresses(part, lookup)
        else:
            urls.append(ControlClient(part).base_url)
    named = any(part.startswith(DNS_SCHEMES) for part in parts)
    return Targets(tuple(dict.fromkeys(urls)), fleet=len(parts) > 1 or named)


def _addresses(target: str, lookup: Lookup) -> list[str]:
    """``dns+http://NAME:PORT`` -> ``http://ADDRESS:PORT`` for each address of one family:
    IPv4 if the name has any, else IPv6. (A dual-stack pod has one of each; taking both
    would count it twice.)"""
    scheme, _, rest = target.removeprefix("dns+").partition("://")
    try:
        parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
        port = parts.port
    except ValueError as exc:
        raise ControlCallFailed(f"{target}: not a valid URL ({exc})") from None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ControlCallFailed(f"{target}: expected dns+{scheme}://NAME:PORT")
    try:
        found = lookup(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ControlCallFailed(
            f"cannot resolve {parts.hostname!r} ({target}): {why}",
            ["nothing was sent to any replica"],
        ) from None
    ipv4 = [info[4][0] for info in found if info[0] == socket.AF_INET]
    ipv6 = [info[4][0] for info in found if info[0] == socket.AF_INET6]
    addresses = ipv4 or ipv6
    if not addresses:
        raise ControlCallFailed(f"{target}: {parts.hostname!r} has no IPv4 or IPv6 address")
    hosts = [f"[{address}]" if ":" in address else address for address in addresses]
    return [f"{scheme}://{host}:{port}" for host in dict.fromkeys(hosts)]


# ---- fan-out ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One replica's answer, or why it failed."""

    url: str
    answer: Json = None
    generation: str | None = None  # the ETag of the answer, unquoted
    error: ControlCallFailed | None = None


def change_everywhere(
    urls: Sequence[str], token: str | None, call: Call, args: argparse.Namespace
) -> list[Answer]:
    """``call`` on every replica at once, each guarded by If-Match of the generation it
    reported just before (or of ``args.if_match``, when given)."""
    return each(urls, token, lambda client: guarded(client, call, args))


def read_everywhere(
    urls: Sequence[str], token: str | None, call: Call, args: argparse.Namespace
) -> list[Answer]:
    return each(urls, token, lambda client: call(client, args))


def guarded(client: ControlClient, call: Call, args: argparse.Namespace) -> Json:
    """``call`` with If-Match of the generation the replica reports now (or of
    ``args.if_match``, when given)."""
    generation = getattr(args, "if_match", None)
    if generation is None:
        client.call("GET", "/api/v1/services")
        if client.etag is None:
            raise ControlCallFailed("its answer has no ETag: the change cannot be guarded")
        generation = client.etag.strip('"')
    return call(client, argparse.Namespace(**{**vars(args), "if_match": generation}))


def each(
    urls: Sequence[str], token: str | None, work: Callable[[ControlClient], Json]
) -> list[Answer]:
    """``work`` with a client of each replica, all at once; the answers in ``urls``' order."""

    def one(url: str) -> Answer:
        client = ControlClient(url, token)
        try:
            answer = work(client)
        except ControlCallFailed as exc:
            return Answer(url, error=exc)
        return Answer(url, answer, (client.etag or "").strip('"') or None)

    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        return list(pool.map(one, urls))


def failed(answers: Sequence[Answer]) -> list[Answer]:
    return [answer for answer in answers if answer.error is not None]


# ---- reports ---------------------------------------------------------------------------------


def change_report(answers: Sequence[Answer]) -> str:
    """One line per replica: ``URL: ok generation N`` or ``URL: failed: why``."""
    return "\n".join(
        f"{a.url}: failed: {_why(a.error)}"
        if a.error is not None
        else f"{a.url}: ok generation {a.generation or '?'}"
        for a in answers
    )


def read_report(answers: Sequence[Answer], render: Callable[[Json], str]) -> str:
    """Each replica's answer under its URL, then what the replicas disagree on."""
    blocks = [
        f"== {a.url}: failed: {_why(a.error)}"
        if a.error is not None
        else f"== {a.url}\n{render(a.answer)}"
        for a in answers
    ]
    return "\n\n".join([*blocks, *disagreements(answers)])


def disagreements(answers: Sequence[Answer]) -> list[str]:
    """`replicas disagree on web's weights: URL stable=90 canary=10; URL ...` per service
    whose weights (or presence) differ between the replicas that answered; else one line
    saying that they agree."""
    seen: dict[str, dict[str, str]] = {}  # service -> url -> its weights
    answered = [a for a in answers if a.error is None]
    for answer in answered:
        for service in services_of(answer.answer):
            versions = service.get("versions") or {}
            weights = " ".join(f"{n}={v.get('weight')}" for n, v in versions.items())
            seen.setdefault(str(service.get("name")), {})[answer.url] = weights
    lines = []
    for name, by_url in seen.items():
        shown = {a.url: by_url.get(a.url, "(no such service)") for a in answered}
        if len(set(shown.values())) > 1:
            listed = "; ".join(f"{url} {text}" for url, text in shown.items())
            lines.append(f"replicas disagree on {name}'s weights: {listed}")
    if seen and not lines and len(answered) > 1:
        lines.append(f"the {len(answered)} replicas that answered agree on every weight")
    return lines


def answers_json(answers: Sequence[Answer]) -> str:
    return json.dumps(
        [
            {"url": a.url, "ok": True, "generation": _number(a.generation), "answer": a.answer}
            if a.error is None
            else {"url": a.url, "ok": False, "error": _why(a.error)}
            for a in answers
        ],
        indent=2,
    )


def _number(generation: str | None) -> int | str | None:
    return int(generation) if generation and generation.isdigit() else generation


def _why(error: ControlCallFailed | None) -> str:
    return error.message if error is not None else ""


def run(
    args: argparse.Namespace,
    targets: Targets,
    token: str | None,
    call: Call,
    *,
    change: bool,
    render: Callable[[Json], str],
) -> int:
    """One ctl action on every replica, reported per replica: 0 if all succeeded, else 1."""
    fan_out = change_everywhere if change else read_everywhere
    answers = fan_out(targets.urls, token, call, args)
    if args.json:
        print(answers_json(answers))
    elif change:
        print(change_report(answers))
    else:
        print(read_report(answers, render))
    return 1 if failed(answers) else 0
