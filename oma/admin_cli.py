"""``oma-admin``: the OMA's administration from the command line, over its REST API.

    oma-admin [--oma URL] [--token-file F | --user NAME] [--json] COMMAND ...

    pairing-code create [--ttl SECONDS]
    enrollments pending | active | approve ID [--reason R] | reject ID [--reason R] | revoke ID
    audit [--vma [--enrollment ID]] [--event-type T] [--actor A] [--limit N]
    users list | create NAME [--role R] | set-role USER ROLE | enable USER | disable USER
          | reset-password USER | delete USER

Authentication: a bearer token read from ``--token-file`` (or ``OMA_TOKEN_FILE``), or a login
as ``--user`` (or ``OMA_USER``) whose password comes from ``OMA_PASSWORD`` or, on a terminal, a
prompt; ``USER`` is a user name or a numeric id. A new user's or a reset password is read the
same way (``OMA_NEW_PASSWORD``, else a prompt, else one line on stdin).

Output is plain text for people (one line per item, tab-separated), or the API's own JSON with
``--json``. A refused request prints ``oma-admin: <the API's message> (<code>)`` on stderr and
exits 1; an OMA that cannot be reached, 2. The calls are the API's: docs/oma.md ("enrollment",
"Users and roles").
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_OMA = "http://127.0.0.1:8082"
API = "/api/v1"


class CliError(Exception):
    """Ends the command: the message on stderr, ``status`` as the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/") + API, timeout=timeout, trust_env=False)
        self.token = token

    def call(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = self.http.request(method, path, json=body, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the OMA at {self.http.base_url}: {e}", 2) from e
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if r.is_error:
            if isinstance(answer, dict) and "error" in answer:
                raise CliError(f"{answer['error']} ({answer.get('code', r.status_code)})")
            raise CliError(f"the OMA answered {r.status_code}: {r.text.strip()[:200]}")
        return answer

    def login(self, username: str, password: str) -> None:
        self.token = str(
            self.call("POST", "/auth/login", body={"username": username, "password": password})["token"]
        )


def read_password(env: str, prompt: str) -> str:
    """From ``env``, else a prompt on a terminal, else one line of stdin."""
    value = os.environ.get(env)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CliError(f"no password: set {env} or give it on stdin")
    return line


def connect(args: argparse.Namespace) -> Client:
    client = Client(args.oma)
    token_file = args.token_file or os.environ.get("OMA_TOKEN_FILE")
    user = args.login_user or os.environ.get("OMA_USER")
    if token_file:
        try:
            client.token = Path(token_file).read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the token file {token_file}: {e.strerror or e}") from e
    elif user:
        client.login(user, read_password("OMA_PASSWORD", f"password for {user}: "))
    else:
        raise CliError("no credentials: give --token-file FILE or --user NAME")
    return client


# -- rendering --------------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None or v == "" else json.dumps(v) if isinstance(v, dict | list) else str(v)

    return "\n".join("\t".join(cell(row.get(c)) for c in columns) for row in rows)


ENROLLMENT_COLUMNS = ("id", "vma_name", "status", "vma_fingerprint", "created_at", "appliance_id")
USER_COLUMNS = ("id", "username", "role", "enabled", "created_at")
AUDIT_COLUMNS = ("created_at", "event_type", "actor", "subject", "client_ip", "details")


# -- commands -------------------------------------------------------------------------------------


def find_user(client: Client, who: str) -> int:
    """A user's id from a numeric id or a user name."""
    if who.isdigit():
        return int(who)
    offset = 0
    while True:
        page = client.call("GET", "/users", params={"limit": 100, "offset": offset})
        for user in page["users"]:
            if user["username"] == who:
                return int(user["id"])
        offset += len(page["users"])
        if not page["users"] or offset >= page["total"]:
            raise CliError(f"no user named {who!r}")


def cmd_pairing_code(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    body = {"ttl_seconds": args.ttl} if args.ttl else {}
    answer = client.call("POST", "/admin/vma/pairing-code", body=body)
    return answer, f"{answer['pairing_code']}\t(valid until {answer['expires_at']})"


def cmd_enrollments(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    action = args.action
    if action in ("pending", "active"):
        answer = client.call("GET", f"/admin/vma/{action}")
        rows = answer["enrollments" if action == "pending" else "vmas"]
        return answer, table(rows, ENROLLMENT_COLUMNS) if rows else f"no {action} enrollments"
    if action == "revoke":
        answer = client.call("DELETE", f"/admin/vma/revoke/{args.id}")
    else:
        body = {"reason": args.reason} if args.reason else {}
        answer = client.call("POST", f"/admin/vma/{action}/{args.id}", body=body)
    return answer, f"{answer.get('id', args.id)}\t{answer.get('status', action)}"


def cmd_audit(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    params: dict[str, Any] = {"limit": args.limit}
    if args.vma:
        if args.enrollment:
            params["enrollment_id"] = args.enrollment
        answer = client.call("GET", "/admin/vma/audit", params=params)
    else:
        params |= {k: v for k, v in (("event_type", args.event_type), ("actor", args.actor)) if v}
        answer = client.call("GET", "/users/audit", params=params)
    return answer, table(answer["events"], AUDIT_COLUMNS) if answer["events"] else "no events"


def cmd_users(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    action = args.action
    if action == "list":
        answer = client.call("GET", "/users", params={"limit": args.limit})
        return answer, table(answer["users"], USER_COLUMNS)
    if action == "create":
        password = read_password("OMA_NEW_PASSWORD", f"new password for {args.name}: ")
        answer = client.call(
            "POST", "/users", body={"username": args.name, "password": password, "role": args.role}
        )
        return answer, table([answer], USER_COLUMNS)
    user_id = find_user(client, args.target)
    if action == "delete":
        answer = client.call("DELETE", f"/users/{user_id}")
        return answer, f"user {args.target} deleted ({answer['tokens_revoked']} tokens revoked)"
    if action == "reset-password":
        password = read_password("OMA_NEW_PASSWORD", f"new password for {args.target}: ")
        answer = client.call("POST", f"/users/{user_id}/password", body={"password": password})
        return answer, f"password of {args.target} reset ({answer['tokens_revoked']} tokens revoked)"
    change: dict[str, Any] = {"role": args.role} if action == "set-role" else {"enabled": action == "enable"}
    answer = client.call("PUT", f"/users/{user_id}", body=change)
    return answer, table([answer], USER_COLUMNS)


# -- the command line -----------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace], tuple[Any, str]]
ROLES = ("viewer", "operator", "admin")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-admin", description="Administer an OMA over its REST API")
    p.add_argument(
        "--oma", default=os.environ.get("OMA_URL", DEFAULT_OMA), help="the OMA's URL (env OMA_URL)"
    )
    p.add_argument("--token-file", help="a file holding a bearer token (env OMA_TOKEN_FILE)")
    p.add_argument(
        "--user",
        dest="login_user",
        help="log in as this user; password from OMA_PASSWORD or a prompt (env OMA_USER)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    sub = p.add_subparsers(dest="command", required=True)

    pc = sub.add_parser("pairing-code", help="pairing codes for VMA enrollment")
    pc_sub = pc.add_subparsers(dest="action", required=True)
    create = pc_sub.add_parser("create", help="create a one-time pairing code")
    create.add_argument("--ttl", type=int, help="seconds the code is valid (default: the OMA's)")
    pc.set_defaults(run=cmd_pairing_code)

    en = sub.add_parser("enrollments", help="VMA enrollments")
    en_sub = en.add_subparsers(dest="action", required=True)
    en_sub.add_parser("pending", help="enrollments awaiting a decision")
    en_sub.add_parser("active", help="approved VMAs")
    for action in ("approve", "reject"):
        decide = en_sub.add_parser(action, help=f"{action} an enrollment (compare its fingerprint first)")
        decide.add_argument("id")
        decide.add_argument("--reason")
    revoke = en_sub.add_parser("revoke", help="revoke an approved VMA")
    revoke.add_argument("id")
    en.set_defaults(run=cmd_enrollments)

    au = sub.add_parser("audit", help="the authentication audit log (or, with --vma, the enrollment log)")
    au.add_argument("--vma", action="store_true", help="the VMA enrollment audit log")
    au.add_argument("--enrollment", help="with --vma: one enrollment's events")
    au.add_argument("--event-type")
    au.add_argument("--actor")
    au.add_argument("--limit", type=int, default=50)
    au.set_defaults(run=cmd_audit)

    us = sub.add_parser("users", help="user accounts")
    us_sub = us.add_subparsers(dest="action", required=True)
    ls = us_sub.add_parser("list")
    ls.add_argument("--limit", type=int, default=100)
    mk = us_sub.add_parser("create", help="password from OMA_NEW_PASSWORD, a prompt or stdin")
    mk.add_argument("name")
    mk.add_argument("--role", choices=ROLES, default="viewer")
    role = us_sub.add_parser("set-role")
    role.add_argument("target", metavar="USER")
    role.add_argument("role", choices=ROLES)
    for action in ("enable", "disable", "delete"):
        us_sub.add_parser(action).add_argument("target", metavar="USER")
    us_sub.add_parser(
        "reset-password", help="password from OMA_NEW_PASSWORD, a prompt or stdin"
    ).add_argument("target", metavar="USER")
    us.set_defaults(run=cmd_users)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run: Command = args.run
    try:
        client = connect(args)
        answer, text = run(client, args)
    except CliError as e:
        print(f"oma-admin: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    print(json.dumps(answer, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
