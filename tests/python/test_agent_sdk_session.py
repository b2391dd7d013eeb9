"""The SDK's reliability layer on its own: the same cases as the Rust session tests
(crates/agent/src/session.rs), so both ends of a stream agree on what a duplicate is."""

from lattice_agents.session import Inbox, Outbox, Verdict, new_msg_id, now_us


def test_duplicates_by_seq_and_msg_id_are_refused_and_gaps_reported():
    inbox = Inbox(0, window_s=60, max_ids=100)
    now = now_us()
    assert inbox.check(1, "a", now) is Verdict.NEW
    assert inbox.check(1, "a", now) is Verdict.DUPLICATE
    assert inbox.check(2, "b", now) is Verdict.NEW
    # Resent under a new seq after a renumbering: caught by the msg_id window.
    assert inbox.check(3, "a", now) is Verdict.DUPLICATE
    assert inbox.hwm == 3
    assert inbox.check(5, "c", now) is Verdict.GAP
    assert inbox.check(4, "d", now + 60_000_000) is Verdict.SKEWED
    # Old but next in line: processed (resent after a long outage).
    assert inbox.check(4, "d", now - 3_600_000_000) is Verdict.NEW
    assert inbox.check(5, "e", now) is Verdict.NEW


def test_msg_id_window_is_bounded():
    inbox = Inbox(0, window_s=60, max_ids=10)
    now = now_us()
    for i in range(1, 1001):
        assert inbox.check(i, str(i), now) is Verdict.NEW
    assert len(inbox) <= 10


def test_outbox_acks_cumulatively_resends_after_and_renumbers():
    out: Outbox[list[int]] = Outbox()
    for _ in range(5):
        out.push(lambda seq: [seq * 10])
    assert out.ack(3) == [(1, [10]), (2, [20]), (3, [30])]
    assert [s for s, _ in out.pending()] == [4, 5]
    assert [s for s, _ in out.after(4)] == [5]
    assert list(out.after(0)) == [(4, [40]), (5, [50])]
    assert list(out.after(9)) == []
    out.renumber(lambda frame, seq: frame.__setitem__(0, seq * 100))
    assert list(out.pending()) == [(1, [100]), (2, [200])]
    assert out.next_seq == 3
    assert out.ack(99) and len(out) == 0 and list(out.after(0)) == []


def test_msg_ids_are_unique():
    ids = {new_msg_id() for _ in range(10_000)}
    assert len(ids) == 10_000
