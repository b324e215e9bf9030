"""Recovery.restore_kv's re-seeds (cluster/recovery.py) against a controller whose workers are
recorded channels: which worker is asked to re-seed which holder, also when another worker dies
while the restores run."""
from types import SimpleNamespace

import pytest

from dejavu.cluster.recovery import Failure, Recovery


class _Channel:
    def __init__(self, log, rank, dead=False):
        self.log, self.rank, self.dead = log, rank, dead

    def send(self, msg):
        if self.dead:
            raise BrokenPipeError("gone")
        self.log.append((self.rank, msg.t, getattr(msg, "replica", None)))


def _controller(world, replies):
    """Ranks in a ring (r's holder is r + 1); replies: what _next_message returns, in order (an
    exception is raised)."""
    log, seq = [], SimpleNamespace(seq_id=1, block_table=[0, 1])
    c = SimpleNamespace(
        world=world, _epoch=2, timeout=5.0, log=log,
        channels={r: _Channel(log, r) for r in range(world)},
        worker_info={r: {"host_id": "h"} for r in range(world)},
        replication=SimpleNamespace(dir=None, watermark_of=lambda s: 3),
        _token_side=lambda: [seq], holder_ranks=lambda r: [(r + 1) % world],
        address=lambda r, key: ["127.0.0.1", 1000 + r])

    def next_message(deadline, doing):
        item = replies.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item
    c._next_message = next_message
    return c


def _restored(rank):
    return SimpleNamespace(t="restored", rank=rank, bad=[], bytes=8, parts=None, error=None)


def test_reseeds_follow_the_restores():
    c = _controller(3, [_restored(1)])
    assert Recovery(c, "respawn", 0).restore_kv({1}, {}) == set()
    # the replacement restores first; the worker whose holder (rank 1) was replaced re-seeds it after
    assert c.log == [(1, "restore", 0), (0, "rereplicate", 0)]


def test_a_failure_during_the_restores_still_reseeds_the_holders_replaced_before():
    c = _controller(4, [Failure({3}, "worker 3 died")])
    with pytest.raises(Failure) as e:
        Recovery(c, "respawn", 0).restore_kv({1}, {})
    assert e.value.dead == {3}
    assert (0, "rereplicate", 0) in c.log  # the next recovery re-seeds only the holders it replaces


def test_a_reseed_to_a_worker_found_gone_is_a_failure():
    c = _controller(3, [_restored(1)])
    c.channels[0].dead = True
    with pytest.raises(Failure) as e:
        Recovery(c, "respawn", 0).restore_kv({1}, {})
    assert e.value.dead == {0}
