"""The Dockerfiles' rules: every image we ship runs as a non-root user with a HEALTHCHECK and a
STOPSIGNAL, takes its base as a build argument (never `latest`), keeps secrets out of its
layers, and installs dependencies in a layer the code does not invalidate."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES_FILE = ROOT / "Dockerfile"
INFRA_FILE = ROOT / "deploy/compose/infra.Dockerfile"
# The targets deploy/compose/build.sh builds, by file.
TARGETS = {
    SERVICES_FILE: ["service", "analytics", "inference-cpu", "inference-gpu"],
    INFRA_FILE: ["redis", "postgres", "prometheus"],
}
SECRET_NAME = re.compile(r"PASSWORD|PEPPER|SECRET|TOKEN|CREDENTIAL|API_KEY|SERVICE_KEY$", re.I)


@dataclass
class Stage:
    name: str
    base: str  # the FROM argument, as written
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The target and the stages it is built FROM, base first."""
        stages = [self.stages[target]]
        while stages[0].base in self.stages:
            stages.insert(0, self.stages[stages[0].base])
        return stages

    def arguments(self, target: str, keyword: str) -> list[str]:
        """Every `keyword` instruction's argument in the target's chain, base first."""
        return [
            arg for stage in self.chain(target) for kw, arg in stage.instructions if kw == keyword
        ]

    def effective(self, target: str, keyword: str) -> str | None:
        """The last `keyword` instruction's argument in the target's chain."""
        found = self.arguments(target, keyword)
        return found[-1] if found else None


def parse(path: Path) -> Dockerfile:
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        argument = argument.strip()
        if keyword == "FROM":
            base, _, name = argument.partition(" AS ")
            current = Stage(name.strip() or f"#{len(stages)}", base.strip())
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{path.name}: {line}"
            name, _, default = argument.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, argument))
    return Dockerfile(global_args, stages)


CASES = [(path, target) for path, targets in TARGETS.items() for target in targets]
IDS = [f"{path.name}:{target}" for path, target in CASES]


@pytest.mark.parametrize(("path", "target"), CASES, ids=IDS)
def test_runs_as_a_non_root_user(path: Path, target: str) -> None:
    user = parse(path).effective(target, "USER")
    assert user is not None, "no USER: the image would run as root"
    assert user.split(":")[0] not in ("root", "0"), user


@pytest.mark.parametrize(("path", "target"), CASES, ids=IDS)
def test_has_a_healthcheck_and_a_stop_signal(path: Path, target: str) -> None:
    dockerfile = parse(path)
    healthcheck = dockerfile.effective(target, "HEALTHCHECK")
    assert healthcheck is not None
    assert healthcheck.upper() != "NONE"
    if path == SERVICES_FILE:
        # Liveness is /healthz: readiness (/readyz) would restart a service whose dependency
        # is away, which is the dependency's problem.
        assert "NARTHEX_HEALTHCHECK_URL" in healthcheck
        env = " ".join(dockerfile.arguments(target, "ENV"))
        assert re.search(r"NARTHEX_HEALTHCHECK_URL=http://127\.0\.0\.1:\S+/healthz", env)
    assert dockerfile.effective(target, "STOPSIGNAL") in ("SIGTERM", "SIGINT")


@pytest.mark.parametrize("path", list(TARGETS), ids=lambda p: p.name)
def test_bases_are_build_arguments_never_latest(path: Path) -> None:
    dockerfile = parse(path)
    for stage in dockerfile.stages.values():
        if stage.base in dockerfile.stages:
            continue
        match = re.fullmatch(r"\$\{(\w+)\}", stage.base)
        assert match, f"stage {stage.name}: FROM {stage.base} is not a build argument"
        default = dockerfile.global_args[match[1]]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", default), f"{match[1]}={default} has no tag"
        assert not default.endswith(":latest"), default
    assert dockerfile.global_args.get("BASE_IMAGE", "python:3.11-slim-bookworm").startswith(
        "python:3.11"
    )


@pytest.mark.parametrize("path", list(TARGETS), ids=lambda p: p.name)
def test_no_secret_in_a_layer(path: Path) -> None:
    for stage in parse(path).stages.values():
        for keyword, argument in stage.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                for name, value in re.findall(r"([\w.]+)=(\S*)", argument) or [(argument, "")]:
                    assert not (SECRET_NAME.search(name) and value), f"{keyword} {name}"
            if keyword in ("COPY", "ADD"):
                sources = [w for w in argument.split() if not w.startswith("--")][:-1]
                assert not any(Path(s).name.startswith(".env") for s in sources), argument
            assert keyword != "ADD", "ADD fetches and unpacks: COPY what the context has"


def test_the_build_context_is_an_allowlist_without_secrets() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context must start from nothing"
    allowed = [line[1:] for line in lines if line.startswith("!")]
    assert not any(a.startswith((".env", ".git", ".venv", ".tools")) for a in allowed), allowed
    assert [a for a in allowed if a.startswith(".state")] == [".state/models/"]


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    dockerfile = parse(SERVICES_FILE)
    chain = dockerfile.chain("code")
    assert [stage.name for stage in chain] == ["workspace", "deps", "code"]
    workspace, deps, code = chain
    for keyword, argument in workspace.instructions + deps.instructions:
        if keyword == "COPY" and "--from=" not in argument:
            sources = argument.split()[:-1]
            # Metadata only: a code change must not invalidate the dependency layer.
            assert all(
                s.endswith(("pyproject.toml", "uv.lock", ".sh")) or s == ".wheelhouse*"
                for s in sources
            ), argument
    runs = [argument for keyword, argument in deps.instructions if keyword == "RUN"]
    assert runs
    assert "install-deps.sh" in runs[0]
    copies = [argument for keyword, argument in code.instructions if keyword == "COPY"]
    assert {"libs/ libs/", "services/ services/"} <= set(copies)


def test_analytics_carries_the_models_baselines_and_not_the_models() -> None:
    """Drift compares scores with each version's `score_baseline` (its metadata.json): the
    analytics image has them where its setting points, from a stage that kept nothing else."""
    dockerfile = parse(SERVICES_FILE)
    env = " ".join(dockerfile.arguments("analytics", "ENV"))
    match = re.search(r"NARTHEX_ANALYTICS_MODEL_REPOSITORY=(\S+)", env)
    assert match is not None, env
    copies = dockerfile.arguments("analytics", "COPY")
    (baselines,) = [c for c in copies if c.endswith(f" {match.group(1)}")]
    assert baselines.startswith("--from=baselines ")
    # Nothing in analytics' own chain copies the model repository itself (model.onnx).
    assert not [c for c in copies if "MODELS_DIR" in c]
    kept = " ".join(a for k, a in dockerfile.stages["baselines"].instructions if k == "RUN")
    assert "! -name metadata.json -delete" in kept
