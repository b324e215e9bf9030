"""StagePipes: hidden states between pipeline stages over TCP, sent asynchronously."""
import socket
import time

import pytest
import torch

from dejavu.parallel.pipe import PipeBroken, StagePipes


@pytest.fixture
def pair():
    a = StagePipes("tok", rank=0, timeout=10)
    b = StagePipes("tok", rank=1, timeout=10)
    broken = []
    a.on_broken = lambda sid, err: broken.append((sid, err))
    a.configure(0, None, ("127.0.0.1", b.port, 1))
    b.configure(0, 0, None)
    yield a, b, broken
    a.close()
    b.close()


def test_sends_return_before_the_receiver_reads_and_arrive_in_order(pair):
    a, b, broken = pair
    # 3 x 16 MiB is more than loopback sockets buffer: a blocking sendall would wait for the reader
    # (and fail after the pipes' 10 s timeout), so reaching the reads proves the sends were queued.
    sent = [torch.randn(4096, 1024) for _ in range(3)]
    for i, t in enumerate(sent):
        a.send(i + 1, t)  # returns at once (queued); nothing reads yet
    assert a._q.unfinished_tasks >= 1, "with no reader, the last send cannot have been written out yet"
    for i, t in enumerate(sent):
        out = b.recv(i + 1, torch.empty(4096, 1024))
        assert torch.equal(out, t)
    a.flush()
    assert not broken and not a.broken


def test_a_step_mismatch_fails_the_receiver(pair):
    a, b, _ = pair
    a.send(7, torch.ones(4, 8))
    with pytest.raises(PipeBroken, match="expected step 6"):
        b.recv(6, torch.empty(4, 8))
    assert b.broken


def test_a_dead_receiver_breaks_the_sender(pair):
    a, b, broken = pair
    a.send(1, torch.ones(4, 8))
    assert torch.equal(b.recv(1, torch.empty(4, 8)), torch.ones(4, 8))
    b.close()  # the next stage died: its end of the connection is gone
    deadline = time.monotonic() + 10
    while not broken and time.monotonic() < deadline:
        try:
            a.send(2, torch.ones(1 << 20))  # big enough that a write hits the reset
        except PipeBroken:
            break
        a.flush()
    assert a.broken and broken and "failed" in broken[0][1]
    with pytest.raises(PipeBroken, match="down"):
        a.send(3, torch.ones(4))


def test_sends_of_an_old_epoch_are_dropped(pair):
    a, b, broken = pair
    a.send(1, torch.ones(2, 2))
    a.flush()
    assert torch.equal(b.recv(1, torch.empty(2, 2)), torch.ones(2, 2))
    # A new epoch (after a recovery): the old connection is dropped and the new one says so in its hello.
    a.configure(1, None, ("127.0.0.1", b.port, 1))
    b.configure(1, 0, None)
    a.send(2, torch.full((2, 2), 2.0))
    assert torch.equal(b.recv(2, torch.empty(2, 2)), torch.full((2, 2), 2.0))
    assert not broken


def test_a_wrong_cluster_token_is_refused(pair):
    _, b, _ = pair
    import msgpack

    from dejavu.parallel.pipe import _LEN

    s = socket.create_connection(("127.0.0.1", b.port))
    hello = msgpack.packb({"token": "wrong", "epoch": 0, "rank": 0})
    s.sendall(_LEN.pack(len(hello)) + hello)
    s.settimeout(5)
    assert s.recv(1) == b""  # closed by the receiver
    s.close()
