"""`optout-relay account hash-password`: the value for accounts[].password_hash."""

from __future__ import annotations

import sys

import click

from ..accounts import hash_password


@click.group()
def account() -> None:
    """Sender accounts (clients outside smtp.trusted_networks log in with AUTH over TLS)."""


@account.command("hash-password")
def hash_password_command() -> int:
    """Read a password (prompted twice, or one line on stdin) and print its scrypt hash."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        click.echo("optout-relay: error: use a password of at least 12 characters", err=True)
        return 2
    click.echo(hash_password(password))
    return 0
