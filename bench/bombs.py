"""MIME and HTML bombs through the pipeline: peak memory and time of one message's rewrite.

Issue 13: a 23 MB multipart/mixed of six million `--z` boundary lines, and one HTML tag with
about nine million attributes, once cost a delivery process gigabytes and minutes. Each bomb
(and, as the yardstick, an ordinary 100 KB newsletter) goes through `Pipeline.prepare` and one
`personalise` in a fresh child process; printed: the child's peak RSS (VmHWM) and CPU seconds,
and what the pipeline decided. With `--baseline TREE` (a checkout, e.g. of main) the same runs
are made with that tree's code first and both are printed side by side with their ratios.

Run: python bench/bombs.py [--baseline /work/main] [--limit-mb 4096] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
HEADERS = (
    b"From: Shop <news@shop.example>\nTo: a@example.org\nSubject: bomb\n"
    b"Date: Tue, 10 Mar 2026 09:14:01 +0000\nMessage-ID: <bomb@shop.example>\n"
    b"MIME-Version: 1.0\n"
)


def boundary_bomb() -> bytes:
    """23 MB: a multipart/mixed whose body is six million delimiter lines."""
    return HEADERS + b"Content-Type: multipart/mixed; boundary=z\n\n" + b"--z\n" * 6_000_000


def attribute_bomb() -> bytes:
    """18 MB of HTML: one <a> start tag with nine million attributes."""
    return (
        HEADERS
        + b"Content-Type: text/html; charset=us-ascii\n\n<html><body><p>Hello</p><a"
        + b" a" * 9_000_000
        + b' href="https://shop.example/">x</a></body></html>\n'
    )


def attribute_bomb_in_mixed() -> bytes:
    """The attribute bomb as the HTML part of a multipart/mixed with a text part."""
    html = b"<html><body><a" + b" a" * 9_000_000 + b">x</a></body></html>\n"
    return (
        HEADERS
        + b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nHi\n"
        + b"--b\nContent-Type: text/html\n\n"
        + html
        + b"--b--\n"
    )


def comment_bomb() -> bytes:
    """21 MB of HTML: three million empty comments, each a token the tokenizer would keep."""
    return (
        HEADERS
        + b"Content-Type: text/html; charset=us-ascii\n\n<html><body><p>Hello</p>"
        + b"<!---->" * 3_000_000
        + b"</body></html>\n"
    )


def newsletter() -> bytes:
    block = (
        '<table width="100%"><tr><td style="padding:24px;color:#333">'
        "<h2>Product {n}</h2><p>Crafted from recycled materials.</p>"
        '<a href="https://shop.example/p/{n}">Shop now</a></td></tr></table>\n'
    )
    html = "<html><body>" + "".join(block.format(n=n) for n in range(600)) + "</body></html>\n"
    return (
        HEADERS
        + b"Content-Type: multipart/alternative; boundary=alt\n\n--alt\n"
        + b"Content-Type: text/plain\n\nOur spring sale.\n--alt\nContent-Type: text/html\n\n"
        + html.encode()
        + b"\n--alt--\n"
    )


BOMBS = {
    "newsletter-100k": newsletter,
    "boundary-lines-6M": boundary_bomb,
    "tag-attributes-9M": attribute_bomb,
    "tag-attributes-9M-in-mixed": attribute_bomb_in_mixed,
    "html-comments-3M": comment_bomb,
}


def child(name: str, limit_mb: int) -> None:
    """In the child: build the bomb, then measure prepare + one personalise."""
    resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))
    sys.path.insert(0, os.environ["BOMB_TREE"])
    from relay.pipeline import Pipeline
    from suppression import AddressHasher
    from tracking import TrackingUrls
    from tracking.signing import Signer

    raw = BOMBS[name]()
    urls = TrackingUrls("https://mail.shop.example", Signer(["bench-signing-key-0123456789abcdef"]))
    hasher = AddressHasher(b"bench-address-key-0123456789abcd")
    before = _peak_kib()
    started = time.process_time()
    outcome: dict[str, object] = {"size": len(raw)}
    try:
        prepared = Pipeline(clicks=True).prepare("BENCH0000001", "news@shop.example", raw)
        copy = prepared.personalise("a@example.org", urls, hasher)
        outcome["copy_size"] = len(copy)
        outcome["decisions"] = [d[:160] for d in prepared.meta.decisions]
        outcome["refusal"] = getattr(prepared, "refusal", None)
    except MemoryError:
        outcome["error"] = f"MemoryError at the {limit_mb} MB address-space limit"
    outcome["cpu_s"] = round(time.process_time() - started, 2)
    outcome["peak_rss_mb"] = round(_peak_kib() / 1024, 1)
    outcome["rss_before_mb"] = round(before / 1024, 1)
    print(json.dumps(outcome))


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(tree: Path, name: str, limit_mb: int, timeout: float) -> dict[str, object]:
    env = {**os.environ, "BOMB_TREE": str(tree), "PYTHONPATH": str(tree)}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--limit-mb", str(limit_mb)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"still running after {timeout:.0f} s (killed)"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    result: dict[str, object] = json.loads(lines[-1])
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare against")
    parser.add_argument("--limit-mb", type=int, default=4096, help="child RLIMIT_AS")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", choices=sorted(BOMBS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.limit_mb)
        return
    names = [args.only] if args.only else list(BOMBS)
    for name in names:
        ours = run(HERE, name, args.limit_mb, args.timeout)
        print(f"{name}:")
        if args.baseline:
            base = run(args.baseline, name, args.limit_mb, args.timeout)
            print(f"  baseline {args.baseline}: {_summary(base)}")
            for key in ("peak_rss_mb", "cpu_s"):
                if isinstance(base.get(key), int | float) and isinstance(
                    ours.get(key), int | float
                ):
                    ratio = float(ours[key]) / max(float(base[key]), 0.01)  # type: ignore[arg-type]
                    print(f"  {key}: this tree / baseline = {ratio:.3f}")
        print(f"  this tree {HERE}: {_summary(ours)}")


def _summary(result: dict[str, object]) -> str:
    if "error" in result and "peak_rss_mb" not in result:
        return str(result["error"])
    parts = [
        f"peak RSS {result.get('peak_rss_mb')} MB",
        f"cpu {result.get('cpu_s')} s",
        f"wall {result.get('wall_s')} s",
    ]
    if result.get("error"):
        parts.append(str(result["error"]))
    if result.get("refusal"):
        parts.append(f"refused: {result['refusal']}")
    decisions = result.get("decisions")
    if isinstance(decisions, list):
        notable = [d for d in decisions if "limit" in d or "failed" in d or "appended" in d]
        parts += notable[:3]
    return "; ".join(parts)


if __name__ == "__main__":
    main()
