"""Imports: every list format, hashed lists enforced, bad rows skipped, nothing ever weakened."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from suppression import (
    MIGRATIONS,
    AddressHasher,
    ImportFormatError,
    ImportOptions,
    ImportReport,
    PermanentReason,
    Reason,
    SuppressionStore,
    import_file,
)
from suppression.formats import Format
from tests.postgres import OpenEngine

KEY = b"import-test-key-0123456789abcdef"


@pytest.fixture
async def store(open_engine: OpenEngine) -> SuppressionStore:
    """On each engine (the conftest fixture `open_engine`)."""
    return SuppressionStore(await open_engine(MIGRATIONS), AddressHasher(KEY))


async def run(
    store: SuppressionStore, text: str | bytes, name: str = "list.csv", **options: Any
) -> ImportReport:
    data = text.encode() if isinstance(text, str) else text
    return await import_file(store, io.BytesIO(data), name, ImportOptions(**options))


async def reason_of(store: SuppressionStore, address: str) -> str | None:
    found = await store.check(address)
    return None if found is None else found.reason


async def table(store: SuppressionStore) -> list[tuple[object, ...]]:
    return await store.database.read(
        lambda db: [
            tuple(row) for row in db.execute("SELECT * FROM suppressions ORDER BY address_hash")
        ]
    )


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Name,E-Mail Address,Note\nAnn,ANN@example.org,x\nBob,bob@Example.org,y\n", "csv"),
        ("id;Contact\n1;ann@example.org\n2;bob@example.org\n", "csv"),
        ("ann@example.org\n# a comment\n\nbob@example.org\n", "list"),
        ("\ufeffemail\r\nann@example.org\r\nbob@example.org\r\n", "csv"),
        ("1,ann@example.org,2024\n2,bob@example.org,2024\n", "csv"),
    ],
)
async def test_address_lists_with_and_without_header(
    store: SuppressionStore, text: str, kind: str
) -> None:
    report = await run(store, text)
    assert (report.format, report.rows, report.added, report.bad) == (kind, 2, 2, 0)
    assert await reason_of(store, "Ann@Example.org") == "import"
    assert await reason_of(store, "bob@example.org") == "import"
    found = await store.check("ann@example.org")
    assert found is not None and found.source == "import:list.csv"


async def test_hashed_lists_are_enforced(store: SuppressionStore) -> None:
    md5 = hashlib.md5(b"carol@example.org").hexdigest()
    sha = hashlib.sha256("dörte@bücher.example".encode()).hexdigest().upper()
    report = await run(store, f"{md5}\n{sha}\nnot-a-digest\n", name="partner.txt")
    assert (report.format, report.added, report.bad) == ("hashes", 2, 1)
    assert report.bad_rows[0].line == 3
    carol = await store.check("Carol@EXAMPLE.org")
    assert carol is not None and (carol.key_kind, carol.address) == ("md5", None)
    dorte = await store.check("DÖRTE@xn--bcher-kva.example")
    assert dorte is not None and dorte.key_kind == "sha256"
    assert await store.check("carol@example.com") is None
    headed = await run(
        store, f"email_sha256,segment\n{hashlib.sha256(b'eve@x.org').hexdigest()},a\n"
    )
    assert (headed.format, headed.added) == ("hashes", 1)
    assert await store.check("eve@x.org") is not None


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        (
            "email,created\nu@example.org,1700000000\n",
            "sendgrid",
            {"u@example.org": "unsubscribe"},
        ),
        (
            "email,created,ip\nc@example.org,1700000000,10.0.0.1\n",
            "sendgrid",
            {"c@example.org": "complaint"},
        ),
        (
            "email,created,reason,status\nb@example.org,1700000000,550 no such user,5.1.1\n",
            "sendgrid",
            {"b@example.org": "hard_bounce"},
        ),
        (
            "address,code,error,created_at\nb@example.org,550,No mailbox,Mon 1 Jan 2024\n",
            "mailgun",
            {"b@example.org": "hard_bounce"},
        ),
        (
            "address,tags,created_at\nu@example.org,*,x\n",
            "mailgun",
            {"u@example.org": "unsubscribe"},
        ),
        ("address,created_at\nc@example.org,x\n", "mailgun", {"c@example.org": "complaint"}),
        (
            "EmailAddress,Reason,LastUpdateTime\nb@example.org,BOUNCE,2024-01-01\n"
            "c@example.org,COMPLAINT,2024-01-02\n",
            "ses",
            {"b@example.org": "hard_bounce", "c@example.org": "complaint"},
        ),
        (
            "EmailAddress,SuppressionReason,Origin,CreatedAt\n"
            "b@example.org,HardBounce,Recipient,2024-01-01\n"
            "c@example.org,SpamComplaint,Recipient,2024-01-01\n"
            "u@example.org,ManualSuppression,Recipient,2024-01-01\n"
            "m@example.org,ManualSuppression,Customer,2024-01-01\n",
            "postmark",
            {
                "b@example.org": "hard_bounce",
                "c@example.org": "complaint",
                "u@example.org": "unsubscribe",
                "m@example.org": "manual",
            },
        ),
    ],
)
async def test_esp_exports_are_mapped_to_reasons(
    store: SuppressionStore, text: str, kind: str, expected: dict[str, str]
) -> None:
    report = await run(store, text, name=f"{kind}.csv")
    assert (report.format, report.added, report.bad) == (kind, len(expected), 0)
    for address, reason in expected.items():
        assert await reason_of(store, address) == reason, address
    history = await store.show(next(iter(expected)))
    assert history.history[0].detail["line"] == 2
    assert history.history[0].source == f"import:{kind}.csv"


async def test_unknown_esp_reasons_are_bad_rows(store: SuppressionStore) -> None:
    report = await run(store, "EmailAddress,Reason,LastUpdateTime\nx@example.org,MAYBE,t\n")
    assert (
        report.bad_rows[0].line == 2 and "unknown SES reason 'MAYBE'" in report.bad_rows[0].message
    )


async def test_an_import_never_weakens_and_rerunning_changes_nothing(
    store: SuppressionStore, tmp_path: Path
) -> None:
    await store.add("ann@example.org", reason=Reason.UNSUBSCRIBE, source="one-click")
    await store.add("bob@example.org", reason=Reason.COMPLAINT, scope="topic:news")
    soon = datetime.now(UTC) + timedelta(days=1)
    await store.add("cy@example.org", reason=Reason.MANUAL, expires_at=soon)
    text = "email\nann@example.org\nbob@example.org\ncy@example.org\nnew@example.org\n"
    later = datetime.now(UTC) + timedelta(days=90)
    first = await run(store, text, scope="topic:news", expires_at=later)
    assert (first.added, first.strengthened, first.unchanged) == (3, 0, 1)
    again = await run(store, text)
    # Global: ann unchanged (an unsubscribe outranks an import), cy made permanent.
    assert (again.added, again.strengthened, again.unchanged) == (2, 1, 1)
    ann = await store.check("ann@example.org")
    assert ann is not None and (ann.reason, ann.source) == ("unsubscribe", "one-click")
    bob = await store.check("bob@example.org", ["topic:news"])
    assert bob is not None and bob.reason == "complaint" and bob.expires_at is None
    cy = await store.check("cy@example.org")
    assert cy is not None and cy.reason == "manual" and cy.expires_at is None
    before = await table(store)
    for _ in range(2):
        rerun = await run(store, text, scope="topic:news", expires_at=later)
        assert (rerun.added, rerun.strengthened, rerun.unchanged) == (0, 0, 4)
    assert await table(store) == before


async def test_bad_rows_are_reported_by_line_and_skipped(store: SuppressionStore) -> None:
    text = (
        b"email,name\n"
        b"ok1@example.org,\xc3\x84\n"  # UTF-8: the next rows are then read as UTF-8 too
        b"not-an-address,B\n"
        b",C\n"
        b"\xff\xfe@example.org,D\n"
        b'"multi\nline"@example.org,E\n'
        b"huge@example.org," + b"y" * 200_000 + b"\n"
        b"ok2@example.org,F\n"
    )
    seen: list[int] = []
    report = await import_file(
        store, io.BytesIO(text), "x.csv", on_bad_row=lambda row: seen.append(row.line)
    )
    assert (report.rows, report.added, report.bad) == (7, 2, 5)
    assert seen == [3, 4, 5, 7, 8]
    messages = [row.message for row in report.bad_rows]
    assert "expected local-part@domain" in messages[0]
    assert messages[1] == "no address"
    assert messages[2] == "not valid UTF-8 (another encoding? pass --encoding)"
    assert "whitespace" in messages[3]
    assert messages[4].startswith("not CSV: field larger than field limit")
    assert await store.check("ok2@example.org") is not None


async def test_batches_do_not_change_the_result(store: SuppressionStore) -> None:
    lines = "\n".join(f"user{i % 40}@example.org" for i in range(100))
    progress: list[tuple[int, int]] = []
    report = await import_file(
        store,
        io.BytesIO(lines.encode()),
        "dup.txt",
        ImportOptions(batch_size=7),
        on_progress=lambda position, so_far: progress.append((position, so_far.rows)),
    )
    assert (report.rows, report.added, report.unchanged) == (100, 40, 60)
    assert len(progress) == 15 and progress[-1] == (len(lines), 100)
    assert [rows for _, rows in progress] == [*range(7, 100, 7), 100]
    assert await store.count() == 40


async def test_our_own_export_imports_back_with_scopes_and_tombstones(
    store: SuppressionStore,
) -> None:
    erased = store.hasher.hash("gone@example.org")
    md5 = "md5:" + hashlib.md5(b"partner@example.org").hexdigest()
    text = (
        "address,address_hash,scope,reason,source,created_at,expires_at\n"
        "ann@example.org,x,topic:news,unsubscribe,one-click,2024-01-01T00:00:00.000Z,\n"
        f",{erased},global,complaint,fbl,2024-01-01T00:00:00.000Z,\n"
        f",{md5},global,import,import:p,2024-01-01T00:00:00.000Z,\n"
        "bo@example.org,y,global,manual,cli,t,2999-01-01T00:00:00.000Z\n"
        ",not-a-key,global,manual,cli,t,\n"
        "cy@example.org,z,planet:mars,manual,cli,t,\n"
    )
    report = await run(store, text, name="backup.csv")
    assert (report.format, report.added, report.bad) == ("optout", 4, 2)
    assert [row.line for row in report.bad_rows] == [6, 7]
    ann = await store.check("ann@example.org", ["topic:news"])
    assert ann is not None and (ann.scope, ann.reason) == ("topic:news", "unsubscribe")
    gone = await store.check("gone@example.org")
    assert gone is not None and (gone.reason, gone.address) == ("complaint", None)
    assert await store.check("partner@example.org") is not None
    bo = await store.check("bo@example.org")
    assert bo is not None and bo.expires_at == "2999-01-01T00:00:00.000Z"


async def test_format_errors_are_raised_before_anything_is_written(
    store: SuppressionStore,
) -> None:
    with pytest.raises(ImportFormatError, match="cannot tell which column"):
        await run(store, "name,city\nAnn,Paris\n")
    with pytest.raises(ImportFormatError, match="does not look like a postmark export"):
        await run(store, "email\na@example.org\n", format=Format.POSTMARK)
    with pytest.raises(PermanentReason):
        await run(
            store,
            "a@example.org\n",
            reason=Reason.UNSUBSCRIBE,
            expires_at=datetime.now(UTC) + timedelta(days=1),
        )
    assert await store.count() == 0
    empty = await run(store, "")
    assert (empty.format, empty.rows) == ("empty", 0)


async def test_forced_formats(store: SuppressionStore) -> None:
    as_list = await run(store, "email\nann@example.org\n", format=Format.LIST)
    assert (as_list.format, as_list.added, as_list.bad) == ("list", 1, 0)
    as_csv = await run(store, "email,created\nbob@example.org,1\n", format=Format.CSV)
    assert as_csv.format == "csv" and await reason_of(store, "bob@example.org") == "import"
    overridden = await run(store, "email,created\ncy@example.org,1\n", reason=Reason.HARD_BOUNCE)
    assert overridden.format == "sendgrid"
    assert await reason_of(store, "cy@example.org") == "hard_bounce"
