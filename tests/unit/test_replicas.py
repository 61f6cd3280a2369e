"""Per-edge references (protocols/replicas.py): both ends stay bit-identical under any message loss."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codecs import Layout
from protocols.errors import PayloadMismatch, ProtocolError
from protocols.replicas import Outgoing, RefMismatch, ReplicaBook, ref_fingerprint

LAYOUT = Layout(shapes=((8, 6), (8,), (3, 4, 2, 2)))
SPEC = b"spec"
CODECS = ["dense", "fp16", "bf16", "int8", "topk:0.1", "powersgd:2", "terngrad"]


def _book(codec: str, init: torch.Tensor, capacity: int = 8) -> ReplicaBook:
    return ReplicaBook(codec, LAYOUT, init, spec_fingerprint=SPEC, capacity=capacity)


def _exchange(x: ReplicaBook, xid: str, theta_x: torch.Tensor, y: ReplicaBook, yid: str,
              theta_y: torch.Tensor, *, deliver_request: bool = True,
              deliver_reply: bool = True) -> tuple[bool, bool]:
    """One push-pull exchange x → y as the node runs it; returns (y decoded x's model, x decoded y's)."""
    out = x.encode(yid, theta_x, round=1)
    if not deliver_request:  # no reply: the requester commits nothing (the peer may roll back to it)
        return False, False
    got_x = True
    try:
        ack = y.decode(xid, out.payload).ack
    except RefMismatch as exc:
        ack, got_x = exc.ack, False
    reply = y.encode(xid, theta_y, round=1, peer_ack=ack)
    y.commit(reply)
    if not deliver_reply:
        return got_x, False
    try:
        incoming = x.decode(yid, reply.payload)
        x.settle_request(out, incoming.ack)
        return got_x, True
    except RefMismatch as exc:
        x.settle_request(out, exc.ack)
        return got_x, False


def _consistent(a: ReplicaBook, aid: str, b: ReplicaBook, bid: str) -> bool:
    a_in, a_out = a.reference_of(bid)
    b_in, b_out = b.reference_of(aid)
    pairs = [(a_out, b_in), (b_out, a_in)]
    return all(p is not None and q is not None and torch.equal(p, q) for p, q in pairs)


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(CODECS), seed=st.integers(0, 2**31),
       steps=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=12))
def test_after_any_losses_a_clean_exchange_leaves_both_ends_bit_identical(
        codec: str, seed: int, steps: list[tuple[bool, bool, bool]]) -> None:
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(LAYOUT.numel, generator=g)
    a, b = _book(codec, init), _book(codec, init)
    theta = {"a": init.clone(), "b": init.clone()}
    for a_requests, req_ok, rep_ok in steps:
        for k in theta:  # both train a little between exchanges
            theta[k] = theta[k] + 0.1 * torch.randn(LAYOUT.numel, generator=g)
        x, xid, y, yid = (a, "a", b, "b") if a_requests else (b, "b", a, "a")
        _exchange(x, xid, theta[xid], y, yid, theta[yid], deliver_request=req_ok, deliver_reply=rep_ok)
    # at most two clean exchanges (a mismatch found in the first is repaired by a snapshot in the second)
    for _ in range(2):
        got = _exchange(a, "a", theta["a"], b, "b", theta["b"])
        if got == (True, True):
            break
    assert got == (True, True)
    assert _consistent(a, "a", b, "b")


@pytest.mark.parametrize("codec", CODECS)
def test_first_contact_starts_from_the_shared_initial_model_without_a_snapshot(codec: str) -> None:
    init = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(0))
    a, b = _book(codec, init), _book(codec, init)

    assert _exchange(a, "a", init + 0.5, b, "b", init - 0.5) == (True, True)
    assert a.snapshots_sent == b.snapshots_sent == 0
    assert _consistent(a, "a", b, "b")


def test_references_converge_to_the_model_when_it_stops_moving() -> None:
    """Error feedback: what top-k leaves out goes out later, so a fixed model is eventually reached."""
    init = torch.zeros(LAYOUT.numel)
    theta = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(1))
    a, b = _book("topk:0.1", init), _book("topk:0.1", init)
    for _ in range(12):
        _exchange(a, "a", theta, b, "b", init)
    view_of_a, _ = b.reference_of("a")
    assert view_of_a is not None
    assert float((view_of_a - theta).norm() / theta.norm()) < 1e-3


def test_different_initial_models_fall_back_to_a_snapshot() -> None:
    a = _book("topk:0.1", torch.zeros(LAYOUT.numel))
    b = _book("topk:0.1", torch.ones(LAYOUT.numel))
    theta = torch.full((LAYOUT.numel,), 2.0)

    first = _exchange(a, "a", theta, b, "b", theta)
    second = _exchange(a, "a", theta, b, "b", theta)

    assert first == (False, False)  # neither can decode the other's difference from its own init
    assert second == (True, True)
    assert a.snapshots_sent == b.snapshots_sent == 1
    assert _consistent(a, "a", b, "b")


def test_an_evicted_peer_starts_over_from_the_initial_model() -> None:
    init = torch.zeros(LAYOUT.numel)
    a, b = _book("int8", init, capacity=1), _book("int8", init)
    theta = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(2))
    _exchange(a, "a", theta, b, "b", theta)
    _exchange(a, "a", theta, _book("int8", init), "c", theta)  # evicts b from a's book

    assert len(a) == 1
    assert _exchange(a, "a", theta, b, "b", theta)[0]  # b accepts a difference from init again
    assert _exchange(a, "a", theta, b, "b", theta) == (True, True)
    assert _consistent(a, "a", b, "b")


def _payload(book: ReplicaBook, **changes: object) -> bytes:
    out: Outgoing = book.encode("x", torch.ones(LAYOUT.numel), round=3)
    body = msgpack.unpackb(out.payload, raw=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("changes", [
    {"fp": b"other"}, {"c": "fp16"}, {"v": 2}, {"r": -1}, {"base": b"short"}, {"new": b""},
    {"ack": 5}, {"data": "text"}, {"data": b"\x00" * 10}, {"extra": 1},
])
def test_malformed_messages_are_refused_and_leave_the_references_alone(changes: dict[str, object]) -> None:
    init = torch.zeros(LAYOUT.numel)
    sender, receiver = _book("int8", init), _book("int8", init)
    before = receiver.reference_of("x")

    with pytest.raises(ProtocolError):
        receiver.decode("x", _payload(sender, **changes))
    assert receiver.reference_of("x") == before


def test_a_message_whose_new_fingerprint_lies_is_refused() -> None:
    init = torch.zeros(LAYOUT.numel)
    with pytest.raises(RefMismatch, match="fingerprint"):
        _book("fp16", init).decode("x", _payload(_book("fp16", init), new=b"\x01" * 16))


def test_a_non_finite_model_is_never_encoded() -> None:
    bad = torch.zeros(LAYOUT.numel)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _book("dense", torch.zeros(LAYOUT.numel)).encode("x", bad, round=1)


def test_oversized_payload_is_refused_before_parsing() -> None:
    book = _book("fp16", torch.zeros(LAYOUT.numel))
    with pytest.raises(ProtocolError, match="exceeds"):
        book.decode("x", b"\x00" * (book.max_data + 10_000))


def test_fingerprint_is_of_the_exact_bits() -> None:
    x = torch.zeros(5)
    y = x.clone()
    y[2] = -0.0
    assert ref_fingerprint(x) == ref_fingerprint(x.clone())
    assert ref_fingerprint(x) != ref_fingerprint(y)


def test_wrong_snapshot_codec_is_refused() -> None:
    a = _book("topk:0.1", torch.zeros(LAYOUT.numel))
    with pytest.raises(PayloadMismatch):
        a.decode("x", _payload(_book("topk:0.1", torch.zeros(LAYOUT.numel)), base=b"", c="int8"))
