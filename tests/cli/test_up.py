"""`narthex up` end to end: real supervisor and services on free 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from narthex.cli.runfile import live_run
from narthex.common.apikeys import parse_api_key
from tests.support.databases import service_unavailable
from tests.support.up import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    SUMMARY_END,
    Up,
    free_port_base,
    narthex_argv,
    narthex_env,
    pid_running,
    port_free,
    read_run_file,
    running_up,
)

pytestmark = pytest.mark.slow

SERVICES = ("gateway", "auth", "features", "inference", "analytics")
UPSTREAMS = SERVICES[1:]
# The gateway redoes an API key's exchange this often: how long a revoked key still works.
REVALIDATE_S = 2


def assert_all_stopped(up: Up) -> None:
    assert up.child_pids, "the run file named no children"
    assert [pid for pid in up.child_pids if pid_running(pid)] == []
    assert [port for port in up.ports if not port_free(port)] == []
    assert not (up.state_dir / "up.json").exists()


@dataclass
class Stack:
    up: Up
    urls: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One platform shared by the tests below; test_sigint_stops_everything ends it."""
    state_dir = tmp_path_factory.mktemp("state")
    # A run file left by a crashed supervisor (its pid is dead) must not block a start.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": "127.0.0.1", "ports": {}, "started_at": "earlier"}
    (state_dir / "up.json").write_text(json.dumps(stale))
    env = narthex_env(NARTHEX_GATEWAY_API_KEY_REVALIDATE_SECONDS=str(REVALIDATE_S))
    with running_up(state_dir, env) as up:
        up.wait_for(SUMMARY_END, READY_TIMEOUT_S)
        up.remember_children()
        urls = {name: f"http://127.0.0.1:{up.port_base + i}" for i, name in enumerate(SERVICES)}
        yield Stack(up, urls)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        yield http


def test_summary_names_urls_docs_logs_and_a_working_curl(
    stack: Stack, client: httpx.Client
) -> None:
    output = stack.up.output
    for url in stack.urls.values():
        assert url in output
    assert f"{stack.urls['gateway']}/docs" in output
    assert str(stack.up.state_dir / "logs") in output
    match = re.search(r"curl -s (\S+)", output)
    assert match is not None, output
    assert match.group(1) == f"{stack.urls['gateway']}/v1/status/inference"
    assert client.get(match.group(1)).status_code == 200
    assert client.get(f"{stack.urls['gateway']}/docs").status_code == 200


def test_the_printed_usage_curl_line_shows_the_demo_tenants_requests(
    stack: Stack, client: httpx.Client
) -> None:
    """With redis-server installed and no REDIS_URL, up starts one: the gateway's usage
    events reach analytics, and the printed curl line shows them."""
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server is not installed")
    assert "analytics  on: redis://127.0.0.1:" in stack.up.output
    match = re.search(r'usage +curl -s -H "Authorization: Bearer (\S+)" (\S+)', stack.up.output)
    assert match is not None, stack.up.output
    headers = {"Authorization": f"Bearer {match.group(1)}"}
    assert match.group(2) == f"{stack.urls['gateway']}/v1/usage"
    assert client.get(f"{stack.urls['gateway']}/v1/keys", headers=headers).status_code == 200

    deadline = time.monotonic() + 30  # a bound for a loaded machine; ~1 s is usual
    while True:
        response = client.get(match.group(2), headers=headers)
        assert response.status_code == 200, response.text
        if response.json()["totals"]["requests"] >= 1:
            break
        assert time.monotonic() < deadline, response.text
        time.sleep(0.25)
    assert any(r["route"] == "/v1/keys" for r in response.json()["by_route"])


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_is_ready(stack: Stack, client: httpx.Client, service: str) -> None:
    assert client.get(f"{stack.urls[service]}/readyz").status_code == 200
    assert (stack.up.state_dir / "logs" / f"{service}.log").stat().st_size > 0


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_gateway_proxies_each_upstreams_status(
    stack: Stack, client: httpx.Client, upstream: str
) -> None:
    response = client.get(f"{stack.urls['gateway']}/v1/status/{upstream}")
    assert response.status_code == 200, response.text


def test_gateway_readyz_names_each_upstream_up(stack: Stack, client: httpx.Client) -> None:
    body = client.get(f"{stack.urls['gateway']}/readyz").json()
    assert {name: body["checks"][name]["status"] for name in UPSTREAMS} == dict.fromkeys(
        UPSTREAMS, "up"
    )


def test_run_file_describes_the_live_supervisor(stack: Stack) -> None:
    info = read_run_file(stack.up.state_dir)
    assert info["pid"] == stack.up.proc.pid
    assert info["host"] == "127.0.0.1"
    assert info["ports"] == {name: stack.up.port_base + i for i, name in enumerate(SERVICES)}
    assert set(info["children"]) == set(SERVICES)
    assert info["started_at"] != "earlier"


def test_status_reports_every_service_ready(stack: Stack) -> None:
    result = subprocess.run(
        narthex_argv("status", "--state-dir", str(stack.up.state_dir)),
        capture_output=True,
        text=True,
        timeout=20,
        env=narthex_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ready") == len(SERVICES), result.stdout


def test_second_up_says_already_running(stack: Stack) -> None:
    started = time.monotonic()
    result = subprocess.run(
        narthex_argv(
            "up", "--port-base", str(free_port_base()), "--state-dir", str(stack.up.state_dir)
        ),
        capture_output=True,
        text=True,
        timeout=20,
        env=narthex_env(),
    )
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert time.monotonic() - started < 10
    assert stack.up.proc.poll() is None  # the first one is untouched


def test_first_run_prints_the_operator_key_once(stack: Stack) -> None:
    match = re.search(r"operator key \(shown once, keep it\): (\S+)", stack.up.output)
    assert match is not None, stack.up.output
    assert parse_api_key(match.group(1)) is not None
    assert stack.up.output.count(match.group(1)) == 1


def test_the_printed_embeddings_curl_line_answers_with_a_vector(stack: Stack) -> None:
    line = next(
        (ln for ln in stack.up.output.splitlines() if ln.strip().startswith("embed ")), None
    )
    assert line is not None, stack.up.output
    argv = shlex.split(line.strip().removeprefix("embed").strip())
    assert argv[0] == "curl"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert "data" in body, done.stdout
    assert len(body["data"][0]["embedding"]) == 384, done.stdout
    assert body["model"] == "minilm:1"


def test_fraud_scores_read_features_with_the_identity_up_gave_inference(
    stack: Stack, client: httpx.Client
) -> None:
    """`up` gave inference a key of its own: a score reads the demo tenant's aggregates
    (not degraded) and changes once the tenant has posted events for the account."""
    match = re.search(r"demo key\s+(\S+)", stack.up.output)
    assert match is not None, stack.up.output
    headers = {"Authorization": f"Bearer {match.group(1)}"}
    gateway = stack.urls["gateway"]
    instance = {"account_id": "up_acct", "merchant_id": "m1", "amount": 900.0, "currency": "USD"}

    def score() -> dict[str, Any]:
        response = client.post(
            f"{gateway}/v1/models/fraud/predict", json={"instances": [instance]}, headers=headers
        )
        assert response.status_code == 200, response.text
        prediction: dict[str, Any] = response.json()["predictions"][0]
        return prediction

    before = score()
    assert before["degraded"] is False, before
    now = time.time()
    events = [
        {**instance, "event_id": f"e{i}", "amount": 20.0 + i, "timestamp": now - 600 + 60 * i}
        for i in range(8)
    ]
    posted = client.post(
        f"{gateway}/v1/events/transactions", json={"events": events}, headers=headers
    )
    assert posted.status_code == 200, posted.text
    assert posted.json()["accepted"] == 8
    after = score()
    assert after["degraded"] is False, after
    assert after["probabilities"][1] != pytest.approx(before["probabilities"][1], abs=1e-4)


def test_demo_key_curl_line_works_until_the_key_is_revoked(
    stack: Stack, client: httpx.Client
) -> None:
    match = re.search(r'curl -s -H "Authorization: Bearer (\S+)" (\S+)', stack.up.output)
    assert match is not None, stack.up.output
    key, url = parse_api_key(match.group(1)), match.group(2)
    assert key is not None
    assert url == f"{stack.urls['gateway']}/v1/keys"
    headers = {"Authorization": f"Bearer {key}"}

    # What the printed curl line does: through the gateway to auth, as the demo tenant.
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    listed = {item["id"]: item for item in response.json()}
    assert listed[key.key_id]["name"] == "narthex-up"
    assert listed[key.key_id]["revoked_at"] is None

    revoke = subprocess.run(
        narthex_argv("keys", "revoke", key.key_id, "--state-dir", str(stack.up.state_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        env=narthex_env(),
    )
    assert revoke.returncode == 0, revoke.stdout + revoke.stderr
    revoked_at = time.monotonic()
    while (status := client.get(url, headers=headers).status_code) == 200:
        # Once the gateway's cached exchange expires, it asks auth again and is refused.
        assert time.monotonic() - revoked_at < REVALIDATE_S + 8, "still accepted"
        time.sleep(0.2)
    assert status == 401


def test_sigint_stops_everything(stack: Stack) -> None:
    """Runs last among the tests on `stack`: it stops it."""
    stack.up.proc.send_signal(signal.SIGINT)
    assert stack.up.wait(STOP_TIMEOUT_S) == 0, stack.up.output
    assert "stopped" in stack.up.output
    assert_all_stopped(stack.up)


def test_run_file_naming_a_reused_pid_is_stale(tmp_path: Path) -> None:
    # After a crash or a container restart the old pid may be someone else's process.
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            stale = {"pid": other.pid, "host": "127.0.0.1", "ports": {}, "started_at": "x"}
            (tmp_path / "up.json").write_text(json.dumps(stale))
            assert live_run(tmp_path) is None
        finally:
            other.kill()


def test_port_taken_by_a_foreign_listener_starts_nothing(tmp_path: Path) -> None:
    base = free_port_base()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", base + 3))
        squatter.listen()
        result = subprocess.run(
            narthex_argv("up", "--port-base", str(base), "--state-dir", str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=20,
            env=narthex_env(),
        )
    assert result.returncode == 1
    assert str(base + 3) in result.stderr
    assert "inference" in result.stderr
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "up.json").exists()
    assert all(port_free(base + offset) for offset in (0, 1, 2, 4))


def test_bad_configuration_shows_the_services_refusal(tmp_path: Path) -> None:
    env = narthex_env(NARTHEX_FEATURES_LOG_LEVEL="chatty")
    with running_up(tmp_path, env) as up:
        assert up.wait(READY_TIMEOUT_S) == 1
        assert "features refused its configuration (exit code 2)" in up.output
        assert "NARTHEX_FEATURES_LOG_LEVEL" in up.output
        assert "Ctrl-C to stop" not in up.output
        assert [port for port in up.ports if not port_free(port)] == []
        assert not (tmp_path / "up.json").exists()


def test_a_service_that_keeps_crashing_stops_everything_with_its_log_tail(
    tmp_path: Path,
) -> None:
    with running_up(tmp_path, args=("--max-crashes", "2")) as up:
        up.wait_for(SUMMARY_END, READY_TIMEOUT_S)
        up.remember_children()
        first = read_run_file(tmp_path)["children"]["inference"]
        os.kill(first, signal.SIGKILL)
        up.wait_for("inference restarted", STOP_TIMEOUT_S)
        second = read_run_file(tmp_path)["children"]["inference"]
        assert second != first
        up.child_pids.append(second)
        assert up.proc.poll() is None  # the first crash is restarted, not fatal
        os.kill(second, signal.SIGKILL)
        assert up.wait(STOP_TIMEOUT_S) == 1
        assert "inference was killed by SIGKILL; restarting it in 0.5 s" in up.output
        assert (
            "inference was killed by SIGKILL while running (2 crashes within 60 s): giving up"
            in up.output
        )
        assert "last " in up.output  # the tail of its log
        assert_all_stopped(up)


def test_concurrent_starts_one_wins_and_ctrl_c_mid_start_is_clean(tmp_path: Path) -> None:
    with running_up(tmp_path) as first, running_up(tmp_path) as second:
        # Whoever loses the lock (or sees the winner's run file) gives up at once.
        deadline = time.monotonic() + 15
        while first.proc.poll() is None and second.proc.poll() is None:
            assert time.monotonic() < deadline, first.output + second.output
            time.sleep(0.05)
        loser, winner = (first, second) if first.proc.poll() is not None else (second, first)
        assert loser.wait(5) == 1
        assert "already running" in loser.output
        # The winner is still starting its services; Ctrl-C now must stop those it started.
        winner.remember_children(at_least=len(UPSTREAMS))
        winner.proc.send_signal(signal.SIGINT)
        assert winner.wait(STOP_TIMEOUT_S) == 0, winner.output
        assert "Ctrl-C to stop" not in winner.output
        assert_all_stopped(winner)


# -- chaos: services killed under load, the platform keeps answering ----------------------------

CLIENTS = 32
# Each client's pace: 32 clients at one score per 2 s stay under the demo tenant's
# standard plan (20/s, burst 50), so answers are scores, not 429s.
CLIENT_PACE_S = 2.0
# The breakers (gateway -> inference, inference -> features) stay open this long before a
# trial call: shortened from the 10 s default so the test is about restarts, not waiting.
BREAKER_RESET_S = 2
PHASE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic
    received: float
    status: int  # 0: no HTTP answer at all (connection refused, reset, timeout)
    degraded: bool | None = None
    retry_after: str | None = None
    problem: str = ""  # a refusal's problem type, its last path segment
    error: str = ""


@dataclass
class Load:
    """What 32 clients scoring fraud through the gateway got, in order of arrival."""

    answers: list[Answer] = field(default_factory=list)

    def since(self, start: float, end: float = float("inf")) -> list[Answer]:
        return [a for a in self.answers if a.sent >= start and a.received <= end]


def tally(answers: list[Answer]) -> dict[str, int]:
    """Answers by outcome: `200 degraded`, `200 whole`, `503 upstream-unavailable
    Retry-After`, `error ConnectError`, ..."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer.status == 0:
            key = f"error {answer.error}"
        elif answer.status == 200:
            key = "200 degraded" if answer.degraded else "200 whole"
        else:
            key = f"{answer.status} {answer.problem}"
            if answer.retry_after is not None:
                key += " Retry-After"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


async def score_forever(gateway: str, key: str, load: Load, stop: asyncio.Event) -> None:
    async def client(i: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        instance = {
            "account_id": f"chaos_{i % 8}",
            "merchant_id": "m1",
            "amount": 42.0,
            "currency": "USD",
        }
        # A client of its own each: one connection per client, like 32 separate callers.
        async with httpx.AsyncClient(base_url=gateway, timeout=10.0, trust_env=False) as http:
            await asyncio.sleep(CLIENT_PACE_S * i / CLIENTS)  # spread out, not in lockstep
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = await http.post(
                        "/v1/models/fraud/predict",
                        json={"instances": [instance]},
                        headers=headers,
                    )
                except httpx.HTTPError as exc:
                    load.answers.append(Answer(sent, time.monotonic(), 0, error=type(exc).__name__))
                else:
                    body = response.json()
                    ok = response.status_code == 200
                    load.answers.append(
                        Answer(
                            sent,
                            time.monotonic(),
                            response.status_code,
                            degraded=bool(body["predictions"][0]["degraded"]) if ok else None,
                            retry_after=response.headers.get("retry-after"),
                            problem="" if ok else str(body.get("type", "")).rsplit("/", 1)[-1],
                        )
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CLIENT_PACE_S)

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


async def until(check: Callable[[], bool], what: str, up: Up) -> float:
    """Poll `check` (bounded); the monotonic time it first held."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not check():
        assert up.proc.poll() is None, f"narthex up exited while waiting for {what}:\n{up.output}"
        assert time.monotonic() < deadline, f"no {what} within {PHASE_TIMEOUT_S} s:\n{up.output}"
        await asyncio.sleep(0.05)
    return time.monotonic()


def kill(up: Up, service: str) -> float:
    pid = read_run_file(up.state_dir)["children"][service]
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


async def chaos(up: Up) -> dict[str, list[Answer]]:
    """The scenario, on a running `up`: the answers of each phase."""
    match = re.search(r"demo key\s+(\S+)", up.output)
    assert match is not None, up.output
    gateway = f"http://127.0.0.1:{up.port_base}"
    load, stop = Load(), asyncio.Event()
    clients = asyncio.create_task(score_forever(gateway, match.group(1), load, stop))
    try:
        started = await until(
            lambda: sum(a.status == 200 for a in load.answers) >= CLIENTS, "scores", up
        )

        # features: killed, restarted; inference scores on defaults meanwhile.
        features_killed = kill(up, "features")
        # Seen within ms of the new process being forked, seconds before it can listen.
        features_restarted = await until(
            lambda: "features restarted" in up.output, "features' restart", up
        )
        await until(lambda: "features is ready again" in up.output, "features ready", up)
        features_back = time.monotonic()
        whole = await until(
            lambda: any(a.sent > features_back and a.degraded is False for a in load.answers),
            "whole scores after features' restart",
            up,
        )
        await asyncio.sleep(CLIENT_PACE_S)  # a round of whole scores from every client

        # inference: killed, restarted; the gateway says 503 + Retry-After meanwhile.
        inference_killed = kill(up, "inference")
        await until(lambda: "inference restarted" in up.output, "inference's restart", up)
        await until(lambda: "inference is ready again" in up.output, "inference ready", up)
        inference_back = time.monotonic()
        scored = await until(
            lambda: any(a.sent > inference_back and a.status == 200 for a in load.answers),
            "scores after inference's restart",
            up,
        )
        await asyncio.sleep(CLIENT_PACE_S)  # one more round from every client
    finally:
        stop.set()
        await clients
    return {
        "before": load.since(started - 3600, features_killed),
        "features killed": load.since(features_killed, whole),
        # Sent after the kill, answered before a new features process was even started:
        # each met features dead. (Not from the first degraded answer: on a busy machine a
        # lookup past its budget degrades one before the kill, with whole ones around it.)
        "features away": load.since(features_killed, features_restarted),
        "features back": load.since(whole, inference_killed),
        "inference killed": load.since(inference_killed, scored),
        "inference back": load.since(scored),
        "all": load.answers,
    }


def test_killed_services_are_restarted_while_32_clients_keep_getting_answers(
    tmp_path: Path,
) -> None:
    """SIGKILL features, then inference, under `narthex up` while 32 clients score fraud
    through the gateway: never a dropped connection; degraded scores while features is
    away and whole ones after its restart; 503 with Retry-After while inference is away
    and scores again after its restart; `narthex status` counts the restarts."""
    env = narthex_env(
        NARTHEX_GATEWAY_BREAKER_RESET_TIMEOUT=str(BREAKER_RESET_S),
        NARTHEX_INFERENCE_FEATURES_BREAKER_RESET_TIMEOUT=str(BREAKER_RESET_S),
    )
    with running_up(tmp_path, env) as up:
        up.wait_for(SUMMARY_END, READY_TIMEOUT_S)
        up.remember_children()
        phases = asyncio.run(chaos(up))
        print("\n" + "\n".join(f"{name}: {tally(got)}" for name, got in phases.items()))
        print(up.output[up.output.index(SUMMARY_END) :])

        # Never a dropped connection, whatever was down.
        assert [a for a in phases["all"] if a.status == 0] == []
        # features away: scores all the same, on defaults; whole again after the restart.
        assert {a.status for a in phases["features killed"]} <= {200, 429}
        assert any(a.degraded for a in phases["features killed"])
        assert all(a.degraded for a in phases["features away"] if a.status == 200)
        assert any(a.degraded is False for a in phases["features back"])
        # inference away: each refusal a 503 with Retry-After, never a bare 5xx.
        refused = [a for a in phases["inference killed"] if a.status not in (200, 429)]
        assert refused, "no request met inference down"
        assert {(a.status, a.retry_after is not None) for a in refused} == {(503, True)}
        # A refused or dropped connection is `upstream-unavailable`; `circuit-open` once the
        # gateway's breaker has counted enough of them (and then nothing is sent at all).
        assert {a.problem for a in refused} <= {"upstream-unavailable", "circuit-open"}
        assert any(a.status == 200 for a in phases["inference back"])

        status = subprocess.run(
            narthex_argv("status", "--state-dir", str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=20,
            env=narthex_env(),
        )
        assert status.returncode == 0, status.stdout + status.stderr
        restarts = dict(re.findall(r"^  (\w+) .* restarts (\d+)", status.stdout, re.MULTILINE))
        assert restarts == {**dict.fromkeys(SERVICES, "0"), "features": "1", "inference": "1"}

        up.child_pids.extend(read_run_file(tmp_path)["children"].values())
        up.proc.send_signal(signal.SIGINT)
        assert up.wait(STOP_TIMEOUT_S) == 0, up.output
        assert_all_stopped(up)
