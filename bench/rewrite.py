"""Parse once, personalise many, against re-parsing per recipient with the stdlib email package.

A 100 KB HTML campaign (multipart/alternative, text and HTML, as marketing tools send it) goes to
1,000 recipients. Printed: the time to build the template once, the time per personalised
recipient, the same per recipient for the stdlib approach (parse, add the footer and the pixel,
serialise), and their ratio. Run: python bench/rewrite.py [--recipients N] [--encoding CTE]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.rewrite import Decorations, Hole, build_template, list_unsubscribe_headers

TARGET_BYTES = 100_000
BLOCK = """
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0">
<tr><td style="padding:24px 32px;font-family:Helvetica,Arial,sans-serif;font-size:16px;
line-height:24px;color:#333333">
<h2 style="margin:0 0 12px;font-size:22px;color:#111111">Product {n}: spring edition</h2>
<p style="margin:0 0 16px">Crafted from recycled materials, now {n}% lighter. Free returns for
30 days, and delivery within two working days to most addresses.</p>
<a href="https://shop.example/p/{n}?utm_source=newsletter&amp;utm_campaign=spring"
style="display:inline-block;background:#0b5fff;color:#ffffff;padding:12px 20px;
border-radius:4px;text-decoration:none">Shop now</a>
</td></tr></table>"""


def campaign(cte: str) -> bytes:
    blocks: list[str] = []
    n = 0
    while sum(len(b) for b in blocks) < TARGET_BYTES - 600:
        n += 1
        blocks.append(BLOCK.format(n=n))
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Spring sale</title></head>"
        '<body style="margin:0;background:#f4f4f4"><center>'
        + "".join(blocks)
        + "</center></body></html>\n"
    )
    message = EmailMessage()
    message["From"] = "Shop <news@shop.example>"
    message["To"] = "customer@example.net"
    message["Subject"] = "Spring sale: everything 20% off"
    message["Message-ID"] = "<spring-2026@shop.example>"
    message.set_content("Our spring sale starts today. Everything 20% off.\n", cte=cte)
    message.add_alternative(html, subtype="html", cte=cte)
    return message.as_bytes(policy=email.policy.SMTP)


def values(i: int) -> dict[Hole, str]:
    token = f"{i:08d}-Zm9vYmFyYmF6cXV4cXV1eA.ZW1haWwgdG9rZW4gc2lnbmF0dXJl"
    return {
        Hole.UNSUBSCRIBE_URL: f"https://mail.shop.example/u/{token}",
        Hole.PIXEL_URL: f"https://mail.shop.example/o/{token}.gif",
    }


def stdlib_personalise(raw: bytes, urls: dict[Hole, str]) -> bytes:
    """What a relay without templates does: parse, edit each text part, serialise."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            text = part.get_content() + f"\n-- \nUnsubscribe: {urls[Hole.UNSUBSCRIBE_URL]}\n"
            part.set_content(text, cte=part["Content-Transfer-Encoding"])
        elif part.get_content_type() == "text/html":
            html = part.get_content()
            at = html.lower().rfind("</body>")
            footer = (
                f'<div><a href="{urls[Hole.UNSUBSCRIBE_URL]}">Unsubscribe</a></div>'
                f'<img src="{urls[Hole.PIXEL_URL]}" width="1" height="1" alt="">'
            )
            part.set_content(
                html[:at] + footer + html[at:],
                subtype="html",
                cte=part["Content-Transfer-Encoding"],
            )
    del message["List-Unsubscribe"]
    message["List-Unsubscribe"] = f"<{urls[Hole.UNSUBSCRIBE_URL]}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return message.as_bytes(policy=email.policy.SMTP)


def per_call(run: Callable[[int], object], count: int, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds per call over `count` calls."""
    best = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(count):
            run(i)
        best.append((time.perf_counter() - started) / count)
    return min(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument(
        "--encoding", default="quoted-printable", choices=["quoted-printable", "base64", "8bit"]
    )
    args = parser.parse_args()
    raw = campaign(args.encoding)
    decorations = Decorations()

    builds = []
    for _ in range(5):
        started = time.perf_counter()
        template = build_template(raw, decorations)
        builds.append(time.perf_counter() - started)
    build = statistics.median(builds)

    def ours(i: int) -> bytes:
        urls = values(i)
        return template.render(urls, list_unsubscribe_headers(urls[Hole.UNSUBSCRIBE_URL]))

    recipient = per_call(ours, args.recipients)
    baseline_count = max(args.recipients // 10, 20)
    baseline = per_call(lambda i: stdlib_personalise(raw, values(i)), baseline_count, 1)

    print(f"message: {len(raw):,} bytes, {args.encoding}, {args.recipients:,} recipients")
    print(f"build template once:            {build * 1e3:9.2f} ms")
    print(f"personalise, per recipient:     {recipient * 1e6:9.1f} us")
    print(
        f"  all {args.recipients:,} recipients:        {recipient * args.recipients * 1e3:9.1f} ms"
    )
    print(f"stdlib email, per recipient:    {baseline * 1e6:9.1f} us  ({baseline_count} timed)")
    print(f"ratio (stdlib / template):      {baseline / recipient:9.1f}x  (target >= 20x)")
    print(
        f"template incl. its build, for all: {(build + recipient * args.recipients) * 1e3:.1f} ms"
        f" vs stdlib {baseline * args.recipients * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
