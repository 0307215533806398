"""Property fuzzing of the vhost-user wire codecs (vduproxy/vhost_user/wire.py), with a short budget.

Whatever bytes a peer sends, a codec either returns a typed value or raises WireError (never a construct error,
an IndexError, an OverflowError...), and what it accepts re-encodes to bytes that decode to the same value.
The long run of the same properties plus the connection is fuzz/run_wire.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vduproxy.vhost_user import wire
from vduproxy.vhost_user.wire import HEADER_SIZE, SPECS, BackendReq, Codec, Req, WireError

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODECS: list[Codec] = sorted(
    {c for spec in [*SPECS.values(), *wire.BACKEND_SPECS.values()] for c in (spec.request, spec.reply) if c},
    key=lambda c: c.name,
)
U64_MAX = (1 << 64) - 1


def memory_table_bytes(n: int) -> st.SearchStrategy[bytes]:
    """A table header claiming n regions, followed by n regions of random bytes."""
    return st.binary(min_size=32 * n, max_size=32 * n).map(lambda body: n.to_bytes(4, "little") + bytes(4) + body)


def config_bytes(payload: bytes) -> st.SearchStrategy[bytes]:
    """A config access whose size field matches its payload; offset and flags random."""
    return st.binary(min_size=8, max_size=8).map(
        lambda hdr: hdr[:4] + len(payload).to_bytes(4, "little") + hdr[4:] + payload
    )


def sized_payload(codec: Codec) -> st.SearchStrategy[bytes]:
    """Bytes of the size a codec expects (so decoding gets past the size check), or of any size."""
    if codec.size is not None:
        exact = st.binary(min_size=codec.size, max_size=codec.size)
    elif codec is wire.MEMORY_TABLE:
        exact = st.integers(0, 10).flatmap(memory_table_bytes)
    elif codec in (wire.CONFIG, wire.CONFIG_REPLY):
        exact = st.binary(max_size=wire.MAX_CONFIG_SIZE + 8).flatmap(config_bytes)
    else:
        exact = st.binary(max_size=wire.MAX_OPAQUE_BODY + 8)
    return st.one_of(exact, st.binary(max_size=300))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@FUZZ
@given(data=st.data())
def test_decode_returns_a_value_or_wire_error(codec: Codec, data: st.DataObject) -> None:
    payload = data.draw(sized_payload(codec))
    try:
        value = codec.decode(payload)
    except WireError as e:
        assert e.reason  # a reason a human can read in the log
        return
    if value is not None and codec.value_type is not None:
        assert isinstance(value, codec.value_type)
    # what was accepted can be sent back and means the same (padding may differ, the value may not)
    assert codec.decode(codec.encode(value)) == value


@FUZZ
@given(st.binary(max_size=40))
def test_header_parse(data: bytes) -> None:
    if len(data) < HEADER_SIZE:
        with pytest.raises(WireError):
            wire.parse_header(data)
        return
    request, flags, size = wire.parse_header(data)
    assert wire.build_header(request, flags, size) == data[:HEADER_SIZE]
    assert wire.req_name(request)  # any number has a printable name


@FUZZ
@given(req=st.sampled_from(list(Req)), data=st.data(), reply=st.booleans())
def test_decode_body_never_escapes(req: Req, data: st.DataObject, reply: bool) -> None:
    spec = SPECS[req]
    codec = (spec.reply or wire.U64) if reply else spec.request
    payload = data.draw(sized_payload(codec))
    try:
        wire.decode_body(req, payload, reply)
    except WireError:
        pass


@FUZZ
@given(req=st.sampled_from(list(BackendReq)), data=st.data(), reply=st.booleans())
def test_decode_backend_body_never_escapes(req: BackendReq, data: st.DataObject, reply: bool) -> None:
    spec = wire.BACKEND_SPECS[req]
    codec = (spec.reply or wire.U64) if reply else spec.request
    try:
        wire.decode_backend_body(req, data.draw(sized_payload(codec)), reply)
    except WireError:
        pass


def u(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


def any_int() -> st.SearchStrategy[int]:
    """Mostly in range for any field, sometimes far outside (negative, above 64 bits)."""
    return st.one_of(u(64), u(8), st.integers(-(1 << 70), 1 << 70))


def dataclass_values(cls: type) -> st.SearchStrategy[object]:
    fields = dataclasses.fields(cls)
    kinds: dict[object, st.SearchStrategy[object]] = {"bytes": st.binary(max_size=24), "bool": st.booleans()}
    if any(f.type in ("MemRegion", "tuple[MemRegion, ...]") for f in fields):
        region = dataclass_values(wire.MemRegion)
        kinds["MemRegion"] = region
        kinds["tuple[MemRegion, ...]"] = st.lists(region, max_size=wire.MAX_MEM_REGIONS + 1).map(tuple)
    kwargs = {f.name: kinds.get(f.type, any_int()) for f in fields if f.name != "padding"}
    return st.builds(cls, **kwargs)


VALUE_TYPES = sorted(
    {c.value_type for c in CODECS if c.value_type is not None and dataclasses.is_dataclass(c.value_type)},
    key=lambda t: t.__name__,
)


@pytest.mark.parametrize("codec", [c for c in CODECS if c.value_type in VALUE_TYPES], ids=lambda c: c.name)
@FUZZ
@given(data=st.data())
def test_encode_any_value(codec: Codec, data: st.DataObject) -> None:
    """Building a message from a value out of range is refused with WireError (or TypeError for the wrong kind
    of value) before a byte is sent; anything built decodes back to the same value."""
    assert codec.value_type is not None
    value = data.draw(dataclass_values(codec.value_type))
    try:
        payload = codec.encode(value)
    except (WireError, TypeError):
        return
    assert codec.decode(payload) == value


@FUZZ
@given(st.lists(st.tuples(u(64), u(64), u(64), u(64)), min_size=1, max_size=wire.MAX_MEM_REGIONS))
def test_memory_table_accepts_only_sane_regions(fields: list[tuple[int, int, int, int]]) -> None:
    body = len(fields).to_bytes(4, "little") + bytes(4)
    for f in fields:
        body += b"".join(v.to_bytes(8, "little") for v in f)
    try:
        table = wire.MEMORY_TABLE.decode(body)
    except WireError:
        return
    assert isinstance(table, wire.MemoryTable)
    ordered = sorted(table.regions, key=lambda r: r.guest_phys_addr)
    for r in ordered:
        assert r.memory_size > 0
        assert r.gpa_end <= U64_MAX + 1 and r.uva_end <= U64_MAX + 1
        assert r.mmap_offset + r.memory_size <= U64_MAX + 1
    for a, b in itertools.pairwise(ordered):
        assert a.gpa_end <= b.guest_phys_addr
