"""The SLA checker on crafted Locust stats CSVs: each kind of breach named, limited requests
and a noisy neighbour left out of the verdict, unusable files refused with one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from narthex.loadtests.run import HERE
from narthex.loadtests.scenario import ScenarioError, load_scenario
from narthex.loadtests.sla import SlaError, check, judge, load_sla, main, read_stats

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)

SLA = """
endpoints:
  embedder POST /v1/embeddings:
    p95_ms: 500
    p99_ms: 1000
    error_rate: 0.01
    min_rps: 1
  watcher GET /v1/quota:
    p95_ms: 100
    p99_ms: 200
    error_rate: 0
    min_rps: 0
"""


def row(
    name: str,
    requests: int,
    failures: int = 0,
    rps: float = 5.0,
    p95: int = 100,
    p99: int = 150,
    kind: str = "POST",
) -> str:
    # 50% .. 90%, then 95%, 98%, 99%, 99.9%, 99.99%, 100%
    percentiles = [p95 // 2] * 5 + [p95, p99, p99, p99, p99, p99]
    fields = [kind, name, requests, failures, p95 // 2, p95 // 2, 1, p99, 100, rps, 0.0]
    return ",".join(str(f) for f in [*fields, *percentiles])


def write(tmp_path: Path, *rows: str, sla: str = SLA) -> tuple[Path, Path]:
    stats = tmp_path / "stats_stats.csv"
    total = ",Aggregated,0,0,0,0,0,0,0,0,0" + ",N/A" * 11
    stats.write_text("\n".join([HEADER, *rows, total]) + "\n")
    sla_path = tmp_path / "sla.yaml"
    sla_path.write_text(sla)
    return stats, sla_path


def run_check(stats: Path, sla_path: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = check(stats, sla_path, out)
    return code, out.getvalue()


def test_within_every_limit_passes_and_says_so_last(tmp_path: Path) -> None:
    stats, sla = write(
        tmp_path,
        row("embedder POST /v1/embeddings", 100, p95=400, p99=900),
        row("watcher GET /v1/quota", 10, rps=0.2, p95=20, p99=30, kind="GET"),
    )
    code, out = run_check(stats, sla)
    assert code == 0, out
    assert out.splitlines()[-1].startswith("SLA PASSED")
    assert "BREACH" not in out


def test_each_breach_is_named_with_its_limit_and_measure(tmp_path: Path) -> None:
    stats, sla = write(
        tmp_path,
        row("embedder POST /v1/embeddings", 100, failures=5, rps=0.5, p95=700, p99=1200),
        row("watcher GET /v1/quota", 10, rps=0.2, p95=20, p99=300, kind="GET"),
    )
    code, out = run_check(stats, sla)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[-1].startswith("SLA FAILED")
    assert "5 breach(es)" in lines[-1]
    assert "embedder POST /v1/embeddings" in lines[-1]
    assert "watcher GET /v1/quota" in lines[-1]
    breaches = [line.split() for line in lines if line.startswith(("embedder", "watcher"))]
    # The breach table: endpoint, measure, SLA, measured.
    assert ["embedder", "POST", "/v1/embeddings", "p95", "<=", "500", "ms", "700", "ms"] in (
        breaches
    )
    assert ["embedder", "POST", "/v1/embeddings", "p99", "<=", "1000", "ms", "1200", "ms"] in (
        breaches
    )
    assert ["watcher", "GET", "/v1/quota", "p99", "<=", "200", "ms", "300", "ms"] in breaches
    error = next(b for b in breaches if "error" in b)
    assert error[-2:] == ["5.00%", "(5/100)"]
    throughput = next(b for b in breaches if "throughput" in b)
    assert throughput[-1] == "0.50/s"


def test_an_endpoint_never_called_breaches_a_minimum_throughput(tmp_path: Path) -> None:
    stats, sla = write(tmp_path, row("watcher GET /v1/quota", 3, kind="GET"))
    code, out = run_check(stats, sla)
    assert code == 1
    assert "none made" in out
    assert out.splitlines()[-1].endswith("on embedder POST /v1/embeddings")


def test_an_endpoint_without_a_minimum_may_go_unused(tmp_path: Path) -> None:
    stats, sla = write(tmp_path, row("embedder POST /v1/embeddings", 100))
    code, out = run_check(stats, sla)
    assert code == 0, out


def test_limited_requests_are_counted_apart_and_never_fail_the_endpoint(tmp_path: Path) -> None:
    # 40 requests refused with 429, fast: neither errors nor flattering latencies.
    stats, sla = write(
        tmp_path,
        row("embedder POST /v1/embeddings", 100, p95=400, p99=900),
        row("embedder POST /v1/embeddings [limited]", 40, p95=2, p99=3),
    )
    verdict = judge(load_sla(sla), read_stats(stats))
    assert verdict.passed
    embedder = next(r for r in verdict.rows if r[0] == "embedder POST /v1/embeddings")
    assert embedder[1:4] == ["100", "40", "5.00"]
    assert embedder[4:6] == ["400", "900"]


def test_a_noisy_neighbours_requests_are_not_judged(tmp_path: Path) -> None:
    stats, sla = write(
        tmp_path,
        row("embedder POST /v1/embeddings", 100, p95=400, p99=900),
        row("flood POST /v1/embeddings", 5000, failures=900, p95=9000, p99=20000),
    )
    code, out = run_check(stats, sla)
    assert code == 0, out
    assert "flood" not in out


@pytest.mark.parametrize(
    ("sla", "message"),
    [
        ("endpoints: {}", "endpoints"),
        ("endpoints:\n  x:\n    p95_ms: 1\n    p99_ms: 1\n    error_rate: 2\n", "error_rate"),
        ("endpoints:\n  x:\n    p95_ms: 1\n    p99_ms: 1\n", "error_rate"),
        ("endpoints:\n  x:\n    p95: 1\n", "p95"),
        ("[unclosed", "not YAML"),
    ],
)
def test_an_unusable_sla_file_is_refused_in_one_line(
    tmp_path: Path, sla: str, message: str
) -> None:
    stats, sla_path = write(tmp_path, row("x", 1), sla=sla)
    code, out = run_check(stats, sla_path)
    assert code == 2
    assert out.startswith("SLA not judged: ")
    assert message in out
    assert len(out.splitlines()) == 1


def test_a_stats_file_that_is_not_locusts_is_refused(tmp_path: Path) -> None:
    stats, sla = write(tmp_path)
    stats.write_text("Name,Requests\nx,1\n")
    code, out = run_check(stats, sla)
    assert code == 2
    assert "Request Count" in out


def test_a_missing_stats_file_is_refused(tmp_path: Path) -> None:
    _, sla = write(tmp_path)
    code, out = run_check(tmp_path / "nothing.csv", sla)
    assert code == 2
    assert "cannot read the stats file" in out


def test_a_name_twice_is_refused_rather_than_judged_on_one_of_them(tmp_path: Path) -> None:
    stats, _ = write(tmp_path, row("x", 1), row("x", 2, kind="GET"))
    with pytest.raises(SlaError, match="twice"):
        read_stats(stats)


def test_the_command_line_exits_with_the_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats, sla = write(tmp_path, row("embedder POST /v1/embeddings", 100, p95=600))
    assert main([str(stats), str(sla)]) == 1
    assert "p95" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["default", "smoke", "impossible"])
def test_the_shipped_sla_files_load(name: str) -> None:
    assert load_sla(HERE / "sla" / f"{name}.yaml").endpoints


@pytest.mark.parametrize("name", ["mix", "noisy-neighbour", "smoke"])
def test_the_shipped_scenarios_load(name: str) -> None:
    scenario = load_scenario(HERE / "scenarios" / f"{name}.yaml")
    assert scenario.users
    assert (scenario.flood is not None) == (name != "mix")


def test_a_scenario_with_an_unknown_user_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("users:\n  tourist:\n    weight: 1\n")
    with pytest.raises(ScenarioError, match="tourist"):
        load_scenario(path)
