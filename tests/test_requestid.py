"""requestid.client_id_line against the rule it keeps, on any text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.requestid import MAX_CLIENT_ID, client_id_line


def fit_to_pass_on(value: str) -> bool:
    """1 to MAX_CLIENT_ID characters of visible ASCII (the documented rule)."""
    return 0 < len(value) <= MAX_CLIENT_ID and all("!" <= char <= "~" for char in value)


@given(st.text(max_size=MAX_CLIENT_ID + 2) | st.text(st.characters(max_codepoint=0x80)))
def test_a_client_id_is_kept_exactly_when_it_is_visible_ascii(value: str) -> None:
    line = client_id_line(value)
    assert line == (b"x-request-id: " + value.encode() + b"\r\n" if fit_to_pass_on(value) else b"")


def test_every_byte_outside_visible_ascii_is_refused() -> None:
    for code in [*range(0x21), *range(0x7F, 0x100)]:
        assert client_id_line(f"a{chr(code)}b") == b""
    assert client_id_line("".join(map(chr, range(0x21, 0x7F)))) != b""
