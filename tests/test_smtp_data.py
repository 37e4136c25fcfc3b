"""DATA as the relay reads it: whole chunks into one buffer, with aiosmtpd's verdicts.

The reader is fed through a real asyncio StreamReader in the odd pieces a network gives,
and the whole relay is driven over a socket for what a client sees.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpd.data import MAX_LINE, DataProblem, discard, read_data
from tests.helpers import StartRelay, relay_settings, spooled_contents, wait_for, with_smtp

# Read data goes through memory only (None), or is spilled to a file past a few octets.
THRESHOLDS = [None, 0, 1, 2, 3, 5, 40]


@pytest.fixture(scope="module")
def spill_dir() -> Iterator[Path]:
    """A directory for spilled messages; module-wide, so that hypothesis may use it."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / "incoming"


def leftovers(directory: Path) -> list[str]:
    """The files in a spill directory (none if it was never made)."""
    return os.listdir(directory) if os.path.isdir(directory) else []


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def read_in_pieces(
    wire: bytes,
    pieces: int = 1,
    size_limit: int | None = None,
    buffer_limit: int = 64 * 1024,
    *,
    spill_to: Path | None = None,
    threshold: int | None = None,
) -> tuple[bytes, DataProblem | None, bytes]:
    """What read_data makes of `wire`, fed in `pieces`; and what it left in the stream.

    With a `threshold` (and `spill_to`), the message goes to a file past that many octets:
    its content is read back from there, and the file is gone afterwards.
    """
    reader = asyncio.StreamReader(limit=buffer_limit)
    step = max(1, -(-len(wire) // pieces))

    async def feed() -> None:
        for start in range(0, len(wire), step):
            reader.feed_data(wire[start : start + step])
            await asyncio.sleep(0)  # let the reader see each piece on its own
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    if threshold is None:
        result = await read_data(reader, size_limit)
    else:
        assert spill_to is not None
        result = await read_data(reader, size_limit, spill_to=spill_to, threshold=threshold)
    await feeding
    content = result.content
    if result.spilled is not None:
        spilled = result.spilled
        assert mode(spilled.file.path) == 0o600
        content = await asyncio.to_thread(spilled.file.read_start, spilled.size + 1)
        assert content.startswith(spilled.head) and len(content) == spilled.size
        await discard(spilled.file)
    if spill_to is not None:
        assert leftovers(spill_to) == []  # nothing left behind, whatever the verdict
    return content, result.problem, await reader.read()


def unstuffed_by_lines(wire: bytes) -> bytes:
    """The reference: aiosmtpd's own line-by-line reading of RFC 5321 §4.5.2."""
    lines = []
    for line in wire.split(b"\r\n")[:-1]:
        if line == b".":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in lines)


@pytest.mark.parametrize("pieces", [1, 3, 1000])
async def test_dots_are_unstuffed_and_the_next_command_is_left_in_the_stream(
    pieces: int,
) -> None:
    wire = b"Subject: dots\r\n\r\n..leading dot\r\nmiddle. dot.\r\n...\r\nend.\r\n.\r\nQUIT\r\n"
    content, problem, rest = await read_in_pieces(wire, pieces)
    assert problem is None
    assert content == b"Subject: dots\r\n\r\n.leading dot\r\nmiddle. dot.\r\n..\r\nend.\r\n"
    assert rest == b"QUIT\r\n"


async def test_an_empty_message_ends_at_the_first_dot() -> None:
    content, problem, rest = await read_in_pieces(b".\r\nMAIL FROM:<a@b>\r\n")
    assert (content, problem, rest) == (b"", None, b"MAIL FROM:<a@b>\r\n")


async def test_a_message_bigger_than_the_stream_buffer_arrives_whole() -> None:
    body = b"".join(b"line %06d of a long campaign\r\n" % i for i in range(20_000))
    wire = b"Subject: big\r\n\r\n" + body + b".\r\n"
    content, problem, _ = await read_in_pieces(wire, pieces=97, buffer_limit=4096)
    assert problem is None
    assert content == b"Subject: big\r\n\r\n" + body


async def test_too_much_data_is_read_to_the_end_then_refused() -> None:
    wire = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000 + b".\r\nNOOP\r\n"
    content, problem, rest = await read_in_pieces(wire, pieces=50, size_limit=1000)
    assert (content, problem, rest) == (b"", DataProblem.TOO_MUCH, b"NOOP\r\n")


async def test_exactly_the_size_limit_is_accepted() -> None:
    message = b"Subject: fits\r\n\r\n" + b"y" * 80 + b"\r\n"
    content, problem, _ = await read_in_pieces(message + b".\r\n", size_limit=len(message))
    assert (content, problem) == (message, None)
    _, problem, _ = await read_in_pieces(message + b".\r\n", size_limit=len(message) - 1)
    assert problem is DataProblem.TOO_MUCH


async def test_line_length_limit_is_aiosmtpds() -> None:
    longest = b"a" * (MAX_LINE - 2) + b"\r\n"  # 999 octets and CRLF: allowed
    content, problem, _ = await read_in_pieces(b"S: x\r\n\r\n" + longest + b".\r\n", pieces=7)
    assert problem is None and content.endswith(longest)
    too_long = b"a" * (MAX_LINE - 1) + b"\r\n"
    _, problem, rest = await read_in_pieces(b"S: x\r\n\r\n" + too_long + b".\r\nRSET\r\n")
    assert problem is DataProblem.TOO_LONG
    assert rest == b"RSET\r\n"


async def test_a_client_that_leaves_mid_message_raises() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await read_in_pieces(b"Subject: cut\r\n\r\nhalf a mess", pieces=2)


lines = st.lists(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(lines, st.integers(min_value=1, max_value=40), st.sampled_from(THRESHOLDS))
async def test_any_message_reads_as_line_by_line_reading_does(
    spill_dir: Path, message_lines: list[bytes], pieces: int, threshold: int | None
) -> None:
    # Dot-stuff as a client must (RFC 5321 §4.5.2), then read it back.
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in message_lines
    )
    wire = stuffed + b".\r\n"
    content, problem, rest = await read_in_pieces(
        wire, pieces, spill_to=spill_dir, threshold=threshold
    )
    assert problem is None and rest == b""
    assert content == unstuffed_by_lines(wire) == b"".join(line + b"\r\n" for line in message_lines)


# Pieces of a wire that exercise every check: line ends of all kinds, dots, and runs that
# make lines near, at and past the limit when joined.
wire_tokens = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.", b".\r\n", b"x", b"y" * 333, b"z" * 999]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(wire_tokens, max_size=40),
    st.integers(min_value=1, max_value=30),
    st.one_of(st.none(), st.integers(min_value=0, max_value=4000)),
    st.sampled_from([16, 100, 2048, 64 * 1024]),
    st.sampled_from([t for t in THRESHOLDS if t is not None] + [700, 1500]),
)
async def test_a_spilled_message_gets_the_verdicts_of_one_in_memory(
    spill_dir: Path,
    tokens: list[bytes],
    pieces: int,
    size_limit: int | None,
    buffer_limit: int,
    threshold: int,
) -> None:
    """Any wire, valid or not, cut anywhere (small stream buffers cut inside lines): the
    same content, problem and rest of the stream whether the message spills or not."""
    wire = b"".join(tokens) + b"\r\n.\r\nNOOP\r\n"
    in_memory = await read_in_pieces(wire, pieces, size_limit, buffer_limit)
    spilled = await read_in_pieces(
        wire, pieces, size_limit, buffer_limit, spill_to=spill_dir, threshold=threshold
    )
    assert spilled == in_memory


@pytest.mark.parametrize("start", [0, 90, 99, 100, 101, 150])
@pytest.mark.parametrize("length", [MAX_LINE - 2, MAX_LINE - 1])
async def test_line_limit_across_the_threshold(spill_dir: Path, start: int, length: int) -> None:
    """A line that begins before the spill threshold and ends after it: 999 octets and
    CRLF pass, 1000 and CRLF are refused."""
    message = b"a" * start + b"\r\n" + b"b" * length + b"\r\nlast\r\n"
    wire = message + b".\r\nRSET\r\n"
    content, problem, rest = await read_in_pieces(
        wire, pieces=13, buffer_limit=256, spill_to=spill_dir, threshold=100
    )
    assert rest == b"RSET\r\n"
    if length == MAX_LINE - 2:
        assert (content, problem) == (message, None)
    else:
        assert (content, problem) == (b"", DataProblem.TOO_LONG)


@pytest.mark.parametrize("threshold", [95, 96, 97, 98, 99, 100])
async def test_stuffed_dots_across_the_threshold(spill_dir: Path, threshold: int) -> None:
    lines = [b"x" * 95, b"..dot", b"...", b"", b"..", b"plain"]
    wire = b"\r\n".join(lines) + b"\r\n.\r\n"
    for pieces in (1, 7, len(wire)):
        content, problem, _ = await read_in_pieces(
            wire, pieces, buffer_limit=16, spill_to=spill_dir, threshold=threshold
        )
        assert problem is None
        assert content == b"x" * 95 + b"\r\n.dot\r\n..\r\n\r\n.\r\nplain\r\n"


async def test_a_big_message_is_spilled_whole_and_the_file_is_private(spill_dir: Path) -> None:
    body = b"".join(b".line %06d, dot-stuffed\r\n" % i for i in range(40_000))
    wire = b"Subject: big\r\n\r\n" + body + b".\r\nQUIT\r\n"
    # read_in_pieces checks the file's mode (0600) and that it goes once discarded.
    content, problem, rest = await read_in_pieces(
        wire, pieces=50, spill_to=spill_dir, threshold=256 * 1024
    )
    assert problem is None and rest == b"QUIT\r\n"
    assert content == b"Subject: big\r\n\r\n" + body.replace(b"\r\n.", b"\r\n")[1:]


async def test_too_much_data_after_the_spill_is_refused_and_the_file_goes(
    spill_dir: Path,
) -> None:
    wire = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000 + b".\r\nNOOP\r\n"
    content, problem, rest = await read_in_pieces(
        wire, pieces=50, size_limit=3000, buffer_limit=256, spill_to=spill_dir, threshold=100
    )
    assert (content, problem, rest) == (b"", DataProblem.TOO_MUCH, b"NOOP\r\n")


async def test_a_spill_file_that_cannot_be_made_means_451_after_the_whole_message(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "incoming"
    blocked.write_bytes(b"not a directory")  # mkdir fails, as on a read-only disk
    wire = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000 + b".\r\nNOOP\r\n"
    content, problem, rest = await read_in_pieces(
        wire, pieces=20, buffer_limit=256, spill_to=blocked, threshold=100
    )
    assert (content, problem, rest) == (b"", DataProblem.CANNOT_STORE, b"NOOP\r\n")
    assert DataProblem.CANNOT_STORE.value.startswith("451 4.3.0")


async def test_a_client_that_leaves_mid_spill_leaves_no_file(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    with pytest.raises(asyncio.IncompleteReadError):
        await read_in_pieces(
            b"Subject: cut\r\n\r\n" + b"y" * 998 + b"\r\n" * 400,
            pieces=9,
            spill_to=incoming,
            threshold=1000,
        )
    assert leftovers(incoming) == []


async def test_a_session_cancelled_mid_spill_leaves_no_file(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    reader = asyncio.StreamReader(limit=64 * 1024)
    reading = asyncio.create_task(read_data(reader, None, spill_to=incoming, threshold=1000))
    reader.feed_data(b"Subject: cut\r\n\r\n" + (b"y" * 998 + b".\r\n") * 400)
    # Written once a batch is waiting: the file exists while the session is cut.
    await wait_for(lambda: bool(leftovers(incoming)), what="a file")
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert leftovers(incoming) == []


def pipelined_session(port: int, message: bytes) -> list[bytes]:
    """Two messages with every command of each sent in one write (RFC 2920)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        replies = [stream.readline()]

        def reply() -> bytes:
            while True:
                line = stream.readline()
                if line[3:4] != b"-":
                    return line

        sock.sendall(b"EHLO client.test\r\n")
        replies.append(reply())
        for _ in range(2):
            sock.sendall(b"MAIL FROM:<news@shop.example>\r\nRCPT TO:<erin@example.org>\r\nDATA\r\n")
            replies.extend([reply(), reply(), reply()])
            sock.sendall(message + b".\r\n")
        sock.sendall(b"QUIT\r\n")
        replies.extend([reply(), reply(), reply()])
        return replies


async def test_pipelined_messages_are_each_spooled_whole(
    tmp_path: Path, closed_port: int, start_relay: StartRelay
) -> None:
    relay = await start_relay(relay_settings(tmp_path, closed_port))  # the mail stays spooled
    message = b"From: news@shop.example\r\nSubject: one\r\n\r\n..dot\r\n" + b"z" * 900 + b"\r\n"
    replies = await asyncio.to_thread(pipelined_session, relay.addresses.smtp[1], message)
    codes = [r[:3] for r in replies]
    # Each message's 250 is read with the next batch of pipelined replies.
    assert b" ".join(codes) == b"220 250 250 250 354 250 250 250 354 250 221"
    stored = await spooled_contents(tmp_path)
    assert stored == [message.replace(b"..dot", b".dot")] * 2


async def test_too_much_data_gets_552_and_the_session_goes_on(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    limit = 10_000
    relay = await start_relay(with_smtp(relay_settings(tmp_path, None), max_message_size=limit))

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", relay.addresses.smtp[1], timeout=10) as client:
            client.ehlo("client.test")
            client.docmd("MAIL FROM:<news@shop.example>")
            client.docmd("RCPT TO:<erin@example.org>")
            client.docmd("DATA")
            client.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (limit // 1000 + 1))
            client.send(b".\r\n")
            return client.getreply(), client.noop()

    too_big, after = await asyncio.to_thread(session)
    assert too_big[0] == 552 and too_big[1].startswith(b"5.3.4")
    assert after[0] == 250
