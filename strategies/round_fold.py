"""One round's train replies folded into E(sum a_k w_k) as they arrive, in the federation's layout.

Each reply states its layout (hash and ciphertext count) before a byte of it is parsed. From
round 2 on the layout is the current global's: a reply in another is refused on arrival, and one
in it is folded into the single running sum and released, so the round holds the sum and one
reply. In round 1 the layout is the one most replies share (ties: the first to arrive) and is
only known once the round closes, so replies are kept per layout: the replies of the layout
leading so far are folded into that layout's sum as they come; a reply in a layout that has not
led is held unparsed (its bytes, which a site sent anyway) until its layout takes the lead, when
they are folded, or the round closes, when they are refused. An honest federation has one
layout: one sum, one reply at a time. A hostile site in a layout of its own costs the bytes it
sent and no parsing (a reply declaring 8000 ciphertexts is refused as it came).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from fedhealth.core.crypto import wire
from strategies.ciphertext_sum import UpdateSum
from strategies.reply_check import CheckedReply, ReplyRejected, release_arrays

Layout = tuple[str, int]  # (layout hash, ciphertext count) as a reply declares them
Reject = Callable[[CheckedReply, ReplyRejected], None]


@dataclass
class _LayoutGroup:
    """The replies declaring one layout: folded into `total` once it has led, else held."""

    layout: Layout
    declared: int = 0
    total: UpdateSum | None = None
    folded: list[CheckedReply] = field(default_factory=list)  # released: facts without bytes
    held: list[CheckedReply] = field(default_factory=list)  # unparsed, with their bytes


@dataclass(frozen=True)
class FoldedRound:
    """What a closed round summed: the running sum, its layout and the replies in it."""

    total: UpdateSum
    layout_hash: str
    used: tuple[CheckedReply, ...]


class RoundFold:
    """Folds a round's screened train replies (see module).

    new_sum: a fresh `UpdateSum` (serial, or over worker processes), one per layout.
    expected: the current global's layout, or None in round 1.
    reject(reply, error): records a reply left out.
    max_updates: the most updates one sum may hold (a quantized preset's `max_sites`, whose
        digits would carry into each other beyond it); later replies are refused. None: any.
    """

    def __init__(self, new_sum: Callable[[], UpdateSum], expected: Layout | None,
                 reject: Reject, max_updates: int | None = None) -> None:
        self.new_sum = new_sum
        self.expected = expected
        self.reject = reject
        self.max_updates = max_updates
        self.groups: dict[Layout, _LayoutGroup] = {}  # in order of first arrival

    def add(self, reply: CheckedReply, layout: Layout) -> None:
        """Fold `reply` (declaring `layout`) if its layout leads; refuse it if it cannot win."""
        if self.expected is not None and layout != self.expected:
            self.reject(reply, _other_layout(layout, self.expected))
            release_arrays(reply.content)
            return
        group = self.groups.setdefault(layout, _LayoutGroup(layout))
        if self.max_updates is not None and group.declared >= self.max_updates:
            self.reject(reply, ReplyRejected(
                f"{group.declared} updates are in this round's sum already, the most this "
                f"preset's sum can hold: raise the quantized preset's max_sites or sample "
                f"fewer sites"))
            release_arrays(reply.content)
            return
        group.declared += 1
        group.held.append(reply)
        if group is self._leader():
            self._fold_held(group)

    def close(self) -> FoldedRound | None:
        """The winning layout's sum (None if no reply of it could be summed); every reply of
        another layout is refused, folded or not."""
        leader = self._leader()
        if leader is None:
            return None
        for group in self.groups.values():
            if group is not leader:
                for reply in (*group.folded, *group.held):
                    self.reject(reply, _other_layout(group.layout, leader.layout))
                    release_arrays(reply.content)
        self.groups = {}
        if leader.total is None or not leader.folded:
            return None
        return FoldedRound(leader.total, leader.layout[0], tuple(leader.folded))

    def _leader(self) -> _LayoutGroup | None:
        """The layout most replies declared so far; the first to arrive among equals."""
        return max(self.groups.values(), key=lambda g: g.declared, default=None)

    def _fold_held(self, group: _LayoutGroup) -> None:
        if group.total is None:
            group.total = self.new_sum()
        while group.held:
            reply = group.held.pop(0)
            try:
                group.total.fold(reply.content[wire.UPDATE])  # type: ignore[arg-type]
            except ReplyRejected as exc:
                self.reject(reply, exc)
                release_arrays(reply.content)
                continue
            group.folded.append(reply.released())


def _other_layout(layout: Layout, expected: Layout) -> ReplyRejected:
    return ReplyRejected(f"layout {layout[0][:12]} in {layout[1]} ciphertexts differs from the "
                         f"federation's {expected[0][:12]} in {expected[1]}")
