"""`landcover-team`: members and their permissions on an authenticated MLflow server.

MLflow's basic-auth server gives the creator of an experiment or registered model MANAGE on it
and everyone else `default_permission` (the README's set-up: NO_PERMISSIONS). A second member
can therefore neither record runs in a colleague's experiment nor promote into a colleague's
registered model until one who MANAGEs it (or an admin) grants it:

    landcover-team add-user bob                       # an admin; the password is asked for
    landcover-team grant bob --experiment chesapeake --permission EDIT
    landcover-team grant bob --model landcover --permission EDIT
    landcover-team show bob --experiment chesapeake --model landcover

Credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (as for every
command), the server from MLFLOW_TRACKING_URI or --tracking-uri. READ sees, EDIT records runs
and registers versions, MANAGE also grants and deletes.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from landcover.errors import LandcoverError
from landcover.reachable import check_tracking_server, is_server_uri

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def _client(uri: str) -> Any:
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def _experiment_id(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"error: no experiment {name!r} on {uri} (or you may not read it)")
    return str(experiment.experiment_id)


def _targets(uri: str, experiment: str | None, model: str | None) -> list[tuple[str, str, str]]:
    """(resource type, resource id, what people call it) for MLflow's permission API."""
    targets = []
    if experiment:
        targets.append(
            ("experiment", _experiment_id(uri, experiment), f"experiment {experiment!r}")
        )
    if model:
        targets.append(("registered_model", model, f"registered model {model!r}"))
    return targets


def grant(uri: str, user: str, experiment: str | None, model: str | None, permission: str) -> None:
    """Give `user` `permission` on an experiment and/or a registered model (MLflow 3's unified
    per-user permission API: a grant replaces the member's earlier one)."""
    client = _client(uri)
    for kind, resource, label in _targets(uri, experiment, model):
        client.grant_user_permission(user, kind, resource, permission)
        print(f"granted: {user} {permission} on {label}")


def show(uri: str, user: str, experiment: str | None, model: str | None) -> None:
    """Print `user`'s permission on an experiment and/or a registered model."""
    client = _client(uri)
    for kind, resource, label in _targets(uri, experiment, model):
        result = client.get_user_permission(user, kind, resource)
        print(f"{user} on {label}: {result.permission}")


def main(argv: list[str] | None = None) -> None:
    """`landcover-team add-user | grant | show`."""
    parser = argparse.ArgumentParser(
        prog="landcover-team", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="the server"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-user", help="create a member (admins only)", parents=[server])
    add.add_argument("user")
    for name, text in (("grant", "give a permission"), ("show", "print permissions")):
        sub = commands.add_parser(name, help=text, parents=[server])
        sub.add_argument("user")
        sub.add_argument("--experiment", help="an experiment's name")
        sub.add_argument("--model", help="a registered model's name")
        if name == "grant":
            sub.add_argument("--permission", required=True, choices=PERMISSIONS)
    args = parser.parse_args(argv)
    if not is_server_uri(args.tracking_uri):
        parser.error("the team server: --tracking-uri http(s)://... or MLFLOW_TRACKING_URI")
    if args.command != "add-user" and not (args.experiment or args.model):
        parser.error("name --experiment and/or --model")
    from mlflow.exceptions import MlflowException

    try:
        check_tracking_server(args.tracking_uri)
        if args.command == "add-user":
            password = new_password(args.user)
            _client(args.tracking_uri).create_user(args.user, password)
            print(f"created: {args.user}")
        elif args.command == "grant":
            grant(args.tracking_uri, args.user, args.experiment, args.model, args.permission)
        else:
            show(args.tracking_uri, args.user, args.experiment, args.model)
    except LandcoverError as err:
        sys.exit(f"error: {err}")
    except MlflowException as err:
        first = (str(err.message).strip().splitlines() or [err.error_code])[0]
        sys.exit(f"error: {args.tracking_uri} answered {err.error_code}: {first}")


def new_password(user: str) -> str:
    """The new member's password: LANDCOVER_NEW_USER_PASSWORD, or asked at the terminal."""
    given = os.environ.get("LANDCOVER_NEW_USER_PASSWORD")
    if given:
        return given
    try:
        password = getpass.getpass(f"password for {user}: ")
    except EOFError:
        raise LandcoverError(
            f"no password for {user}: there is no terminal to ask at; set "
            "LANDCOVER_NEW_USER_PASSWORD"
        ) from None
    if not password:
        raise LandcoverError(f"an empty password for {user} is refused")
    return password


if __name__ == "__main__":
    main()
