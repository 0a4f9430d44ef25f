"""The `narthex` command line (typer): thin wrappers over narthex.cli.up and narthex.cli.admin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from narthex.cli.restarts import RestartPolicy
from narthex.cli.supervisor import UpOptions
from narthex.cli.up import run_status, run_up

if TYPE_CHECKING:
    from narthex.cli.admin import Action

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
    max_crashes: Annotated[
        int,
        typer.Option(
            min=1,
            help="A service that crashes this often within --crash-window is not restarted"
            " again: everything stops (1: the first crash stops everything).",
        ),
    ] = RestartPolicy.max_crashes,
    crash_window: Annotated[
        float, typer.Option(min=1.0, help="Seconds over which --max-crashes counts crashes.")
    ] = RestartPolicy.window,
    observe: Annotated[
        bool,
        typer.Option(
            "--observe",
            help="Also start Prometheus (Debian's `prometheus`) with the project's rules,"
            " scraping every service, on 127.0.0.1 at the port after analytics'.",
        ),
    ] = False,
) -> None:
    """Start all five services, wait until they are ready, and supervise them until Ctrl-C:
    a service that crashes is restarted, after a backoff that doubles with each recent crash,
    while the others keep serving."""
    options = UpOptions(
        host=host,
        port_base=port_base,
        state_dir=state_dir,
        timeout=timeout,
        restarts=RestartPolicy(max_crashes=max_crashes, window=crash_window),
        observe=observe,
    )
    raise typer.Exit(run_up(options))


@app.command()
def status(state_dir: StateDir = Path(".state")) -> None:
    """Show whether each service of a running `narthex up` is ready, and how often it was
    restarted (exit 1 if any is not ready)."""
    raise typer.Exit(run_status(state_dir))


# Imported here, not on use: its own imports are light (no service stack).
from narthex.cli.mesh import mesh_app  # noqa: E402

app.add_typer(mesh_app, name="mesh")

models_app = typer.Typer(help="The built-in models (fraud, minilm).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("build")
def models_build(
    repository: Annotated[
        Path,
        typer.Option("--repository", help="Model repository to write into.", file_okay=False),
    ] = Path(".state/models"),
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Build just this model (repeatable): fraud, minilm."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even what is already there.")] = False,
) -> None:
    """Build the built-in models (deterministic, offline); only the missing ones by default."""
    from narthex.cli.models import BUILTIN, build_models

    unknown = sorted(set(only or ()) - set(BUILTIN))
    if unknown:
        raise typer.BadParameter(f"no built-in model {unknown[0]!r}; choose from {sorted(BUILTIN)}")
    build_models(repository, only or [], force=force, out=sys.stdout)


# -- administration: straight on the auth database, where the auth service runs --------------

admin_app = typer.Typer(help="Set up a deployment: the operator tenant.", no_args_is_help=True)
tenants_app = typer.Typer(help="Create and list tenants.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Create, list, revoke and rotate a tenant's API keys.", no_args_is_help=True
)
app.add_typer(admin_app, name="admin")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Auth database, a SQLAlchemy async URL (default: NARTHEX_AUTH_DATABASE_URL).",
    ),
]
AuthStateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Use a `narthex up` state directory: its auth.db and keys/"
        " (default: the NARTHEX_AUTH_* environment, as the auth service reads it).",
        file_okay=False,
    ),
]
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id or name.")]
KeyId = Annotated[str, typer.Argument(help="Key id, or its nx_<env>_<id> prefix.")]


def _admin(database_url: str | None, state_dir: Path | None, action: Action) -> None:
    # Imported on use: the auth service's stack costs seconds that `up --help` need not pay.
    from narthex.cli.admin import Target, run

    raise typer.Exit(run(Target(database_url, state_dir), action))


@admin_app.command()
def bootstrap(
    name: Annotated[str, typer.Option(help="Name of the operator tenant.")] = "operator",
    database_url: DatabaseUrl = None,
    state_dir: AuthStateDir = None,
) -> None:
    """Create the operator tenant (role admin, plan enterprise) and print its key, once."""
    from narthex.cli import admin

    _admin(database_url, state_dir, lambda service: admin.bootstrap(service, name))


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name (unique).")],
    plan: Annotated[str, typer.Option(help="free, standard, enterprise or custom.")] = "standard",
    admin_role: Annotated[
        bool, typer.Option("--admin", help="Role admin instead of tenant.")
    ] = False,
    database_url: DatabaseUrl = None,
    state_dir: AuthStateDir = None,
) -> None:
    """Create a tenant and print its id."""
    from narthex.cli import admin

    _admin(
        database_url,
        state_dir,
        lambda service: admin.create_tenant(service, name, plan, admin_role),
    )


@tenants_app.command("list")
def tenants_list(database_url: DatabaseUrl = None, state_dir: AuthStateDir = None) -> None:
    """List the tenants: id, name, plan, roles, created."""
    from narthex.cli import admin

    _admin(database_url, state_dir, admin.list_tenants)


@keys_app.command("create")
def keys_create(
    tenant: Tenant,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "default",
    expires_in_days: Annotated[
        int | None, typer.Option(min=1, help="Expire after this many days (default: never).")
    ] = None,
    database_url: DatabaseUrl = None,
    state_dir: AuthStateDir = None,
) -> None:
    """Create an API key for a tenant and print it, once."""
    from narthex.cli import admin

    _admin(
        database_url,
        state_dir,
        lambda service: admin.create_key(service, tenant, name, expires_in_days),
    )


@keys_app.command("list")
def keys_list(
    tenant: Tenant, database_url: DatabaseUrl = None, state_dir: AuthStateDir = None
) -> None:
    """List a tenant's keys (prefix, name, dates, status); secrets are never shown."""
    from narthex.cli import admin

    _admin(database_url, state_dir, lambda service: admin.list_keys(service, tenant))


@keys_app.command("revoke")
def keys_revoke(
    key_id: KeyId, database_url: DatabaseUrl = None, state_dir: AuthStateDir = None
) -> None:
    """Revoke a key now (the gateway stops accepting it within its revalidation time)."""
    from narthex.cli import admin

    _admin(database_url, state_dir, lambda service: admin.revoke_key(service, key_id))


@keys_app.command("rotate")
def keys_rotate(
    key_id: KeyId, database_url: DatabaseUrl = None, state_dir: AuthStateDir = None
) -> None:
    """Replace a key: print the new one, once; the old one works until its grace expiry."""
    from narthex.cli import admin

    _admin(database_url, state_dir, lambda service: admin.rotate_key(service, key_id))


if __name__ == "__main__":
    app()
