"""DKIM-sign personalised copies of an ~88 KB HTML marketing message: relay.dkim against
dkimpy.sign on the same inputs (same key, header list, relaxed/relaxed), interleaved copy by copy
so that load on the machine hits both alike. Then every one of our signatures is verified with
dkimpy (or a sample, with --verify N), and re-signed at dkimpy's timestamp to compare b= and bh=.

Run from the repository root (needs `pip install dkimpy`):

    python bench/dkim.py                    # 1,000 copies of 88 KB
    python bench/dkim.py --copies 200 --size 40000 --verify 50

Exit status 1 when a signature fails to verify or differs from dkimpy's.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import quopri
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# This file is bench/dkim.py: run as a script, its folder would shadow dkimpy's `dkim` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from relay.dkim import DkimTxtRecord, generate_key, load_signer  # noqa: E402

DOMAIN = "shop.example"
SELECTOR = "s2025"
ED_SELECTOR = "e2025"
CRLF = b"\r\n"


def html_part(recipient: int, size: int) -> str:
    """A newsletter as marketing tools write it: nested tables, inline CSS, indentation, with
    this recipient's tracked links, unsubscribe link and open pixel."""
    token = f"r{recipient:06d}-{(recipient * 7919) % 1000003:07d}"
    head = f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Spring sale: 20% off everything</title>
    <style type="text/css">
      body {{ margin: 0; padding: 0; background-color: #f4f4f4; }}
      .wrapper {{ width: 100%; table-layout: fixed; }}
      .product td {{ padding: 12px 16px; font-family: Helvetica, Arial, sans-serif; }}
      @media only screen and (max-width: 600px) {{ .column {{ display: block !important; }} }}
    </style>
  </head>
  <body>
    <center class="wrapper">
      <table role="presentation" width="600" cellpadding="0" cellspacing="0" border="0">
        <tr>
          <td style="padding: 24px; text-align: center;">
            <a href="https://shop.example/?utm_source=news&amp;utm_medium=email&amp;rcpt={token}">
              <img src="https://cdn.shop.example/logo.png" width="180" alt="Shop">
            </a>
          </td>
        </tr>
"""
    blocks: list[str] = []
    length, number = len(head), 0
    while length < size:
        number += 1
        blocks.append(
            f"""        <tr class="product">
          <td class="column" style="padding: 12px 16px; border-bottom: 1px solid #e0e0e0;">
            <table role="presentation" width="100%" cellpadding="0" cellspacing="0">
              <tr>
                <td width="120" valign="top">
                  <img src="https://cdn.shop.example/p/{number}.jpg" width="120"
                    alt="Item {number}">
                </td>
                <td valign="top" style="font-size: 15px; line-height: 22px; color: #333333;">
                  <h2 style="margin: 0 0 8px 0; font-size: 18px;">Product number {number}</h2>
                  <p style="margin: 0 0 8px 0;">Hand-made from recycled materials, shipped in
                    plastic-free packaging. Now 20% off until Sunday &ndash; while stocks last.</p>
                  <a href="https://t.shop.example/c/{token}/{number}" style="color: #0a7cff;">
                    Shop now &rarr;</a>
                </td>
              </tr>
            </table>
          </td>
        </tr>
"""
        )
        length += len(blocks[-1])
    foot = f"""        <tr>
          <td style="padding: 24px; font-size: 12px; color: #888888; text-align: center;">
            You receive this because you subscribed at shop.example.
            <a href="https://mail.shop.example/u/{token}">Unsubscribe</a> at any time.
            <img src="https://mail.shop.example/o/{token}.gif" width="1" height="1" alt="">
          </td>
        </tr>
      </table>
    </center>
  </body>
</html>
"""
    return head + "".join(blocks) + foot


def html_size_for(size: int) -> int:
    """The HTML length that makes a message of about `size` bytes."""
    guess = size * 85 // 100
    for _ in range(3):
        guess = guess * size // len(message(0, guess))
    return guess


def message(recipient: int, html_size: int) -> bytes:
    token = f"r{recipient:06d}-{(recipient * 7919) % 1000003:07d}"
    html = quopri.encodestring(html_part(recipient, html_size).encode()).replace(b"\n", CRLF)
    text = (
        "Hello,\r\n\r\nOur spring sale starts today: 20% off everything until Sunday.\r\n"
        f"Shop now: https://shop.example/sale?rcpt={token}\r\n\r\n"
        f"Unsubscribe: https://mail.shop.example/u/{token}\r\n"
    ).encode()
    headers = [
        b'From: "Shop News" <news@shop.example>',
        f"To: Customer {recipient} <customer{recipient}@example.org>".encode(),
        b"Subject: Spring sale: 20% off everything",
        b"Date: Tue, 04 Mar 2025 10:00:00 +0000",
        f"Message-ID: <spring-2025.{token}@shop.example>".encode(),
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/alternative; boundary="=_b1"',
        f"List-Unsubscribe: <https://mail.shop.example/u/{token}>".encode(),
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        b"Feedback-ID: spring-2025:news:shop",
    ]
    body = CRLF.join(
        [
            b"--=_b1",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            text,
            b"--=_b1",
            b"Content-Type: text/html; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            html,
            b"--=_b1--",
            b"",
        ]
    )
    return CRLF.join(headers) + CRLF + CRLF + body


def tag(field: bytes, name: str) -> bytes:
    unfolded = re.sub(rb"\r\n[ \t]", b" ", field)
    found = re.search(rb"(?:^|[; ])" + name.encode() + rb"=([^;]*)", unfolded)
    assert found is not None, name
    return re.sub(rb"\s+", b"", found.group(1))


def summary(label: str, seconds: Sequence[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return (
        f"{label:<26} mean {statistics.fmean(ms):7.3f} ms   median {statistics.median(ms):7.3f}"
        f"   p95 {p95:7.3f}   min {ms[0]:7.3f}"
    )


def timed(fn: Callable[[], bytes]) -> tuple[bytes, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--size", type=int, default=88_000, help="bytes per message")
    parser.add_argument(
        "--verify", default="all", help="'all' or how many signatures to verify with dkimpy"
    )
    args = parser.parse_args(argv)
    dkimpy: Any = importlib.import_module("dkim")

    folder = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    key_path, record = generate_key(DOMAIN, SELECTOR, folder)
    ed_path, ed_record = generate_key(DOMAIN, ED_SELECTOR, folder, "ed25519")
    signer = load_signer(DOMAIN, SELECTOR, key_path)
    dual = load_signer(
        DOMAIN, SELECTOR, key_path, second_selector=ED_SELECTOR, second_key_file=ed_path
    )
    pem = key_path.read_bytes()

    html_size = html_size_for(args.size)
    copies = [message(n, html_size) for n in range(args.copies)]
    sizes = [len(c) for c in copies]
    print(
        f"{len(copies)} copies of {min(sizes)}-{max(sizes)} bytes, RSA-2048, relaxed/relaxed; "
        f"python {sys.version.split()[0]}, dkimpy {importlib.metadata.version('dkimpy')}"
    )
    names = [n.strip().encode() for n in tag(signer.sign(copies[0]), "h").decode().split(":")]

    def theirs_sign(copy: bytes) -> bytes:
        return bytes(
            dkimpy.sign(
                copy,
                SELECTOR.encode(),
                DOMAIN.encode(),
                pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=names,
            )
        )

    for copy in copies[:3]:  # warm up both
        signer.sign(copy)
        theirs_sign(copy)
    ours: list[bytes] = []
    theirs: list[bytes] = []
    ours_s: list[float] = []
    theirs_s: list[float] = []
    dual_s: list[float] = []
    for number, copy in enumerate(copies):
        sig, seconds = timed(lambda c=copy: signer.sign(c))  # type: ignore[misc]
        ours.append(sig)
        ours_s.append(seconds)
        sig, seconds = timed(lambda c=copy: theirs_sign(c))  # type: ignore[misc]
        theirs.append(sig)
        theirs_s.append(seconds)
        if number % 10 == 0:
            dual_s.append(timed(lambda c=copy: dual.sign(c))[1])  # type: ignore[misc]

    print(summary("relay.dkim (rsa-sha256)", ours_s))
    print(summary("dkimpy.sign (rsa-sha256)", theirs_s))
    print(summary("relay.dkim (rsa + ed25519)", dual_s) + "   (every 10th copy)")
    mean_ratio = statistics.fmean(theirs_s) / statistics.fmean(ours_s)
    median_ratio = statistics.median(theirs_s) / statistics.median(ours_s)
    print(
        f"ratio dkimpy/ours: {mean_ratio:.1f}x by mean, {median_ratio:.1f}x by median "
        f"(target 5x: {'met' if min(mean_ratio, median_ratio) >= 5 else 'NOT met'})"
    )
    print(
        f"throughput: ours {len(copies) / sum(ours_s):.0f} signatures/s, "
        f"dkimpy {len(copies) / sum(theirs_s):.0f} signatures/s (one core)"
    )

    failures = 0
    sample = len(copies) if args.verify == "all" else min(len(copies), int(args.verify))
    step = max(1, len(copies) // sample)
    checked = list(range(0, len(copies), step))[:sample]
    dns = _dns([record, ed_record])
    start = time.perf_counter()
    verified = sum(bool(dkimpy.verify(ours[i] + copies[i], dnsfunc=dns)) for i in checked)
    verify_seconds = time.perf_counter() - start
    scope = "all" if len(checked) == len(copies) else f"a sample of {len(checked)}, every {step}th"
    print(
        f"dkimpy.verify: {verified}/{len(checked)} of our signatures verify ({scope}, "
        f"{verify_seconds:.1f} s)"
    )
    failures += len(checked) - verified

    same = 0
    for copy, their in zip(copies, theirs, strict=True):
        again = signer.sign(copy, timestamp=int(tag(their, "t")))
        same += tag(again, "b") == tag(their, "b") and tag(again, "bh") == tag(their, "bh")
    print(f"identical b= and bh= to dkimpy.sign at its timestamp: {same}/{len(copies)}")
    failures += len(copies) - same

    both = dual.sign(copies[0])
    ed_ok = _ed25519_verifies(dkimpy, both + copies[0], dns)
    print(f"ed25519 second signature verifies with dkimpy: {ed_ok}")
    return 1 if failures else 0


def _dns(records: Sequence[DkimTxtRecord]) -> Callable[..., bytes | None]:
    table = {r.name: "".join(r.strings).encode() for r in records}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.decode().rstrip("."))

    return lookup


def _ed25519_verifies(dkimpy: Any, signed: bytes, dns: Callable[..., bytes | None]) -> str:
    try:
        importlib.import_module("nacl")
    except ImportError:
        return "not checked (PyNaCl absent: pip install 'dkimpy[ed25519]')"
    return str(bool(dkimpy.DKIM(signed).verify(idx=1, dnsfunc=dns)))


if __name__ == "__main__":
    sys.exit(main())
