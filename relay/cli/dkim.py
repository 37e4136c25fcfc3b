"""`optout-relay dkim keygen`: a signing key and the DNS record that publishes it."""

from __future__ import annotations

from pathlib import Path

import click

from ..dkim import DkimError, KeyAlgorithm, generate_key
from ..stores import ensure_private_dir
from .common import config_option, settings_from


@click.group()
def dkim() -> None:
    """DKIM signing keys."""


@dkim.command("keygen")
@config_option
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="rsa (verified everywhere) or ed25519 (RFC 8463; not every receiver verifies it yet).",
)
@click.option(
    "--bits", type=click.IntRange(2048, 8192), default=2048, show_default=True, help="RSA key size."
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where to write the key (default: STORAGE.DIR/dkim).",
)
@click.argument("domain")
@click.argument("selector")
def keygen(
    config_path: Path | None,
    algorithm: KeyAlgorithm,
    bits: int,
    directory: Path | None,
    domain: str,
    selector: str,
) -> int:
    """Create a key for SELECTOR._domainkey.DOMAIN and print the TXT record to publish."""
    settings = settings_from(config_path)
    if directory is None:
        ensure_private_dir(settings.storage.dir)
        directory = settings.storage.dir / "dkim"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path, record = generate_key(
            domain,
            selector,
            directory,
            algorithm,
            bits=bits,
        )
    except (DkimError, OSError) as exc:
        click.echo(f"optout-relay: error: {exc}", err=True)
        return 1
    click.echo(str(record))
    click.echo(f"key written to {path}; add to the config:", err=True)
    click.echo(
        f'[[dkim.keys]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{path}"',
        err=True,
    )
    return 0
