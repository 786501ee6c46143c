"""A fleet for tests: several real grayproxy processes with one config, and what each says."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from procs import ProxyProcess, http_get

CONFIG = """\
listen: "127.0.0.1:${data_port}"
control: {listen: "127.0.0.1:${control_port}"}
services:
  - name: web
    baseline: stable
    versions:
      stable: {endpoints: ["%(stable)s"]}
      canary: {endpoints: ["%(canary)s"]}
    split:
      weights: {stable: %(stable_weight)s, canary: %(canary_weight)s}
      hash_on: [{header: x-user-id}]
    outlier_detection: {consecutive_5xx: 0}  # a failing canary stays in rotation (not a 503)
"""


def fleet_config(stable: str, canary: str, weights: tuple[int, int] = (50, 50)) -> str:
    """The replicas' config: service web, versions stable and canary at these addresses."""
    stable_weight, canary_weight = weights
    return CONFIG % {
        "stable": stable,
        "canary": canary,
        "stable_weight": stable_weight,
        "canary_weight": canary_weight,
    }


@contextlib.contextmanager
def running_fleet(config: str, count: int = 3) -> Iterator[list[ProxyProcess]]:
    """``count`` grayproxy processes with the same config, each on its own ports."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ProxyProcess(config)) for _ in range(count)]


def urls(replicas: Sequence[ProxyProcess]) -> str:
    return ",".join(replica.control_url for replica in replicas)


def service(replica: ProxyProcess, name: str = "web") -> dict[str, Any]:
    status, headers, body = http_get(f"{replica.control_url}/api/v1/services/{name}")
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    assert headers["etag"] == f'"{answer["generation"]}"'
    return answer


def weights(replica: ProxyProcess) -> dict[str, float]:
    return {name: v["weight"] for name, v in service(replica)["versions"].items()}


def served_by(replica: ProxyProcess, user: str) -> str:
    status, headers, _ = http_get(f"{replica.data_url}/", headers={"x-user-id": user})
    assert status == 200
    return headers["x-grayproxy-version"]
