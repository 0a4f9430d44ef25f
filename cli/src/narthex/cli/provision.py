"""`python -m narthex.cli.provision`: what a container deployment sets up once, before its
services start — what `narthex up` does on every run, for a stack it does not run.

On the auth database and signing-keys directory the auth service's own environment names
(NARTHEX_AUTH_*): the signing key (generated if there is none), the operator tenant (its
key printed once, never written), the demo tenant and the inference service's identity, and
a key for each of those two written to `--out` (`demo.key`, `inference.key`; mode 0600),
where the inference service reads its own (NARTHEX_INFERENCE_SERVICE_KEY_FILE). Runs again
and again without change: once both key files exist it touches nothing (delete them, or the
volume, for fresh keys). Imports nothing of the CLI's own dependencies (typer, kubectl...):
the auth image runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.cli.admin import (
    EXPECTED_ERRORS,
    Provisioned,
    Target,
    auth_settings,
    error_line,
    open_service,
    provision,
)

DEMO_KEY_FILE = "demo.key"
INFERENCE_KEY_FILE = "inference.key"


def _write_secret(path: Path, value: str) -> None:
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")


def run(out_dir: Path, out: IO[str], err: IO[str]) -> int:
    """0 once the stack's identities and keys exist (made now or earlier), 1 on failure."""
    demo_file, inference_file = out_dir / DEMO_KEY_FILE, out_dir / INFERENCE_KEY_FILE
    if demo_file.is_file() and inference_file.is_file():
        print(f"narthex provision: already done ({out_dir}); nothing changed", file=out)
        return 0
    settings = None
    try:
        settings = auth_settings(Target())
        # The auth service generates a missing key only in dev; a deployment's first start
        # makes it here, once, where the auth service will find it.
        SigningKeyRing(settings.signing_keys_dir, generate=True)
        done = asyncio.run(_provision(settings))
    except EXPECTED_ERRORS as exc:
        print(f"narthex provision: {error_line(exc, settings)}", file=err, flush=True)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_secret(inference_file, str(done.inference_key))
    _write_secret(demo_file, str(done.demo_key))
    if done.operator_key is not None:
        print(f"operator key (shown once, keep it): {done.operator_key}", file=out)
    else:
        print(f"operator   {done.operator}: bootstrapped earlier, its key shown then", file=out)
    print(
        f"demo       tenant {done.demo.name} ({done.demo.id}), plan {done.demo.plan_name}", file=out
    )
    print(f"demo key   in {demo_file}", file=out)
    print(f"inference  its service key in {inference_file}", file=out, flush=True)
    return 0


async def _provision(settings: AuthSettings) -> Provisioned:
    async with open_service(settings) as service:
        return await provision(service)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m narthex.cli.provision", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/run/narthex/provision"),
        help="directory for demo.key and inference.key (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    return run(args.out, sys.stdout, sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
