"""``protos.errors.status_message``: every status message fits gRPC's metadata, cut visibly."""

from __future__ import annotations

from meshserve.common.errors import MAX_STATUS_MESSAGE_BYTES, status_message


def test_a_short_message_is_unchanged():
    assert status_message("input 'X' has shape [2] but model 'm' expects [-1, 4]") == \
        "input 'X' has shape [2] but model 'm' expects [-1, 4]"


def test_a_long_message_keeps_head_and_tail_and_says_what_was_cut():
    message = "input 'X' has shape " + str([1] * 10_000) + " but model 'm' expects [-1, 4]"
    bounded = status_message(message)
    assert len(bounded.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert bounded.startswith("input 'X' has shape [1, 1")
    assert bounded.endswith("but model 'm' expects [-1, 4]")
    assert "bytes cut]" in bounded


def test_multibyte_characters_are_never_split():
    bounded = status_message("\u00fc\u20ac\U0001f600" * 1000)
    assert len(bounded.encode("utf-8")) <= MAX_STATUS_MESSAGE_BYTES  # encodes: no broken character
    assert "\ufffd" not in bounded
