"""How opens and clicks may be measured (CNIL deliberation 2026-042; DESIGN rule 12).

- `individual`: per recipient, unless the recipient withdrew;
- `consented`: per recipient for those who consented to it (per purpose), aggregate for
  everyone else;
- `aggregate`: counted per campaign, day and machine verdict, naming nobody; every copy of
  a message carries the same pixel and link URLs;
- `off`: no pixel, no click rewriting.

The modes are ordered from the narrowest: a per-message header may narrow the mode it is
given (`Mode.narrowed`), never widen it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from suppression.consent import NO_WORD, PURPOSES, Consent, Purpose, parse_purposes

__all__ = ["MODES", "PURPOSES", "Mode", "Modes", "Purpose", "click_mode", "parse_purposes"]


class Mode(StrEnum):
    OFF = "off"
    AGGREGATE = "aggregate"
    CONSENTED = "consented"
    INDIVIDUAL = "individual"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def narrowed(self, other: Mode) -> Mode:
        """The narrower of the two: what a message may ask of the mode it is given."""
        return self if self.rank <= other.rank else other

    @property
    def tracks(self) -> bool:
        """Whether anything at all is measured (a pixel, rewritten links)."""
        return self is not Mode.OFF

    @property
    def may_name(self) -> bool:
        """Whether some recipient may be measured individually."""
        return self in (Mode.CONSENTED, Mode.INDIVIDUAL)


_RANKS = {Mode.OFF: 0, Mode.AGGREGATE: 1, Mode.CONSENTED: 2, Mode.INDIVIDUAL: 3}
# In the contract's order (DESIGN.md: `individual | aggregate | consented | off`).
MODES = ("individual", "aggregate", "consented", "off")


def click_mode(value: bool | str) -> Mode:
    """`tracking.clicks` as a mode: false (off, as it always was), true (individual), or a
    mode's name."""
    if value is True:
        return Mode.INDIVIDUAL
    if value is False:
        return Mode.OFF
    return Mode(value)


@dataclass(frozen=True, slots=True)
class Modes:
    """The modes of opens and clicks that apply to a message (relay, account, message)."""

    opens: Mode = Mode.INDIVIDUAL
    clicks: Mode = Mode.OFF

    def of(self, purpose: Purpose) -> Mode:
        return self.opens if purpose is Purpose.OPENS else self.clicks

    def narrowed(self, to: Mode) -> Modes:
        return Modes(self.opens.narrowed(to), self.clicks.narrowed(to))

    @property
    def may_name(self) -> bool:
        return self.opens.may_name or self.clicks.may_name

    def for_copy(
        self, consent: Consent = NO_WORD, header: frozenset[Purpose] = frozenset()
    ) -> Modes:
        """What one recipient's copy gets: `individual` or `aggregate` (or `off`), from the
        recipient's word (`consent`) and the consent the sender vouched for in the message
        (`header`, X-Optout-Consent). A withdrawal always wins."""
        return Modes(
            copy_mode(self.opens, Purpose.OPENS, consent, header),
            copy_mode(self.clicks, Purpose.CLICKS, consent, header),
        )


def copy_mode(mode: Mode, purpose: Purpose, consent: Consent, header: frozenset[Purpose]) -> Mode:
    """A message's mode for `purpose`, decided for one recipient (see `Modes.for_copy`)."""
    if not mode.may_name:
        return mode
    if purpose in consent.withdrawn:
        return Mode.AGGREGATE
    if mode is Mode.INDIVIDUAL or purpose in consent.granted or purpose in header:
        return Mode.INDIVIDUAL
    return Mode.AGGREGATE


def measured(modes: Modes) -> Callable[[Consent], dict[str, str]]:
    """How a recipient with a given word is measured under `modes`, per purpose (for
    data-subject exports)."""

    def describe(consent: Consent) -> dict[str, str]:
        copy = modes.for_copy(consent)
        return {Purpose.OPENS.value: copy.opens.value, Purpose.CLICKS.value: copy.clicks.value}

    return describe
