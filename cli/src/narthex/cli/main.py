"""The `narthex` command line (typer): thin wrappers over narthex.cli.up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from narthex.cli.up import UpOptions, run_status, run_up

app = typer.Typer(
    name="narthex",
    help="narthex: run the platform locally and look after it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="Where the run file (up.json), its lock and the service logs live.",
        file_okay=False,
    ),
]


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface every service binds.")] = "127.0.0.1",
    port_base: Annotated[
        int,
        typer.Option(
            min=1,
            max=65535 - 4,
            help="gateway on this port; auth, features, inference, analytics on the next four.",
        ),
    ] = 8000,
    state_dir: StateDir = Path(".state"),
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for every service to be ready.")
    ] = 60.0,
) -> None:
    """Start all five services, wait until they are ready, and supervise them until Ctrl-C."""
    options = UpOptions(host=host, port_base=port_base, state_dir=state_dir, timeout=timeout)
    raise typer.Exit(run_up(options))


@app.command()
def status(state_dir: StateDir = Path(".state")) -> None:
    """Show whether each service of a running `narthex up` is ready (exit 1 if any is not)."""
    raise typer.Exit(run_status(state_dir))


if __name__ == "__main__":
    app()
