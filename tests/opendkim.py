"""OpenDKIM's verifier for tests, with a private DNS that serves only the test's records.

opendkim-testmsg (Debian package opendkim-tools) looks keys up in DNS only. `OpenDkim.verify`
runs it in a private network and mount namespace (unshare) where /etc/resolv.conf points at
a tiny DNS server on that namespace's own loopback answering with the given TXT records: no
traffic leaves the namespace. Inside, this file runs as a script (`_namespace_main`). The
`opendkim` fixture (conftest.py) skips when the tool or the namespaces are unavailable.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.dkim import DkimTxtRecord


@dataclass(frozen=True)
class Verdict:
    returncode: int
    stderr: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.stderr


@dataclass(frozen=True)
class OpenDkim:
    tool: str
    unshare: str

    def verify(
        self, messages: Sequence[bytes], records: Sequence[DkimTxtRecord], folder: Path
    ) -> list[Verdict]:
        """opendkim-testmsg's verdict on each message, with `records` as the only DNS."""
        paths = []
        for number, message in enumerate(messages):
            path = folder / f"message-{number}.eml"
            path.write_bytes(message)
            paths.append(str(path))
        job = folder / "job.json"
        job.write_text(
            json.dumps(
                {
                    "tool": self.tool,
                    "folder": str(folder),
                    "records": {r.name: list(r.strings) for r in records},
                    "messages": paths,
                }
            )
        )
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        command = [self.unshare, "--net", "--mount", "--", sys.executable, __file__, str(job)]
        done = subprocess.run(command, capture_output=True, env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return [Verdict(v["returncode"], v["stderr"]) for v in json.loads(done.stdout)]


def _namespace_main(job_file: str) -> None:
    """Inside `unshare --net --mount`: loopback up, /etc/resolv.conf -> 127.0.0.1, a DNS server
    there answering TXT queries from the job's records, then opendkim-testmsg on each message."""
    import fcntl

    job = json.loads(Path(job_file).read_text())
    folder = Path(job["folder"])
    records: dict[str, list[str]] = {k.lower(): v for k, v in job["records"].items()}

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, request))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))  # IFF_UP
    resolv = folder / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 53))

    def answer(query: bytes) -> bytes:
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode())
            i += 1 + query[i]
        qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
        question = query[12 : i + 5]
        strings = records.get(".".join(labels).lower())
        if strings is None or qtype != 16:
            return query[:2] + struct.pack("!HHHHH", 0x8583, 1, 0, 0, 0) + question
        rdata = b"".join(bytes([len(s)]) + s.encode() for s in strings)
        record = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 60, len(rdata)) + rdata
        return query[:2] + struct.pack("!HHHHH", 0x8580, 1, 1, 0, 0) + question + record

    def serve() -> None:
        while True:
            query, peer = server.recvfrom(4096)
            server.sendto(answer(query), peer)

    threading.Thread(target=serve, daemon=True).start()
    verdicts = []
    for path in job["messages"]:
        with open(path, "rb") as message:
            done = subprocess.run(
                [job["tool"]], stdin=message, capture_output=True, timeout=60, check=False
            )
        verdicts.append({"returncode": done.returncode, "stderr": done.stderr.decode().strip()})
    print(json.dumps(verdicts))


if __name__ == "__main__":  # OpenDkim.verify runs this file inside its namespaces
    _namespace_main(sys.argv[1])
