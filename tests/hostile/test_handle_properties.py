"""Reservation handles under generated input: whatever the claim values (separators,
NULs, lone surrogates, the service's own framing characters), a handle verifies as
signed, and changing any one field, or the MAC, is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.handles import Handle, HandleKeys, SettleRefusal

pytestmark = [pytest.mark.unit]

KEYS = HandleKeys.random()
text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
counts = st.integers(min_value=0, max_value=2**53)


@st.composite
def handles(draw: st.DrawFn) -> Handle:
    org = draw(text)
    return Handle(
        reservation_id=f"{draw(st.text('0123456789abcdef:l', max_size=40))}@{org}",
        subject=draw(text),
        org=org,
        api=draw(st.sampled_from(["openai.chat", "openai.completions", "anthropic.messages"])),
        model=draw(text),
        input_estimate=draw(counts),
        output_reserved=draw(counts),
        stream=draw(st.booleans()),
    )


@given(h=handles())
def test_signed_handles_verify(h: Handle) -> None:
    assert KEYS.verify(h, KEYS.sign(h)) is None


@given(h=handles(), field=st.sampled_from(Handle._fields), data=st.data())
def test_any_one_changed_field_is_refused(h: Handle, field: str, data: st.DataObject) -> None:
    mac = KEYS.sign(h)
    old = getattr(h, field)
    if isinstance(old, bool):
        new: object = not old
    elif isinstance(old, int):
        new = data.draw(counts.filter(lambda n: n != old))
    else:
        new = data.draw(text.filter(lambda t: t != old))
    assert KEYS.verify(h._replace(**{field: new}), mac) is not None  # type: ignore[arg-type]


@given(h=handles(), mac=st.text(max_size=40))
def test_made_up_macs_are_refused(h: Handle, mac: str) -> None:
    out = KEYS.verify(h, mac)
    assert out in (SettleRefusal.UNSIGNED, SettleRefusal.FORGED)
    assert (out is SettleRefusal.UNSIGNED) == (mac == "")
