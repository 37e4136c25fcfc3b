"""The baseline: a plain aiosmtpd pass-through relay that forwards each message unchanged.

It answers 250 once the downstream took the message (no spool, no rewrite), forwarding over
a small pool of persistent aiosmtplib connections so it is not slowed by reconnecting.
Usage: python bench/passthrough.py LISTEN_PORT DOWNSTREAM_PORT [POOL_SIZE]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session


class PassThrough:
    def __init__(self, downstream_port: int, pool_size: int) -> None:
        self.port = downstream_port
        self.idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self.slots = asyncio.Semaphore(pool_size)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        async with self.slots:
            client = self.idle.get_nowait() if not self.idle.empty() else None
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
                await client.connect()
            try:
                await client.sendmail(
                    envelope.mail_from, envelope.rcpt_tos, envelope.original_content
                )
            except aiosmtplib.SMTPException as exc:
                client.close()
                return f"451 4.4.0 forward failed: {exc}"
            self.idle.put_nowait(client)
        return "250 2.0.0 Ok: forwarded"


async def main(listen: int, downstream: int, pool_size: int) -> None:
    handler = PassThrough(downstream, pool_size)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="passthrough.test"), "127.0.0.1", listen
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    )
