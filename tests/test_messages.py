"""The typed control protocol (cluster/messages.py): every kind round-trips through its msgpack
frame, and an unknown kind or a missing, extra or mistyped field is refused with an error that
names the kind and the field."""
import dataclasses
import socket
import typing

import msgpack
import pytest

from dejavu.cluster import messages as m
from dejavu.parallel.wire import Channel

SEQ = m.StepSeq(ids=[5, 6], start=0, blocks=[3], temp=0.7, top_k=4, top_p=0.9, seed=11, banned=[2])

# One filled-in example of every kind (the test below checks that none is missing).
EXAMPLES = [
    m.Welcome(), m.Refused(msg="bad cluster token"), m.Shutdown(),
    m.Config(rank=1, role="token", worker_name="t0.0", model="random:llama-tiny", dtype="float32", device="cpu",
             seed=0, tp=1, pp=2, layers=[[0, 1], [1, 2]], first_rank=1, num_blocks=64, block_size=4,
             master="127.0.0.1:1", world=3, backend="gloo", timeout=60.0, tp_groups=[[0], [1], [2]], kv_token="k",
             pipes=True, heartbeat_interval=0.5, swap=m.SwapConfig(resident=2, host_blocks=128),
             replicate=m.ReplicateConfig(dir=None, prefix="dejavu-x-"), kv_transport="auto", shm_prefix="p",
             kv_host="10.0.0.2", local_rank=1, epoch=3),
    m.Pipes(epoch=2, prev=0, next=["127.0.0.1", 4000, 2], holders=[["127.0.0.1", 4001], ["127.0.0.2", 4002]]),
    m.Peers(token_workers=[m.TokenWorker(worker="t0.0", host="127.0.0.1", hostname="h", kv_port=5, ipc=None,
                                         num_blocks=64)],
            transfers=[{"src": "p0.0", "dst": "t0.0", "layers": [0, 2]}]),
    m.Step(mb=1, id=7, prefill=False, seqs=[SEQ], live=[3, 4]),
    m.Step(mb=1, id=8, prefill=True, seqs=[dataclasses.replace(SEQ, x=m.SampleExtra(
        pres=0.5, freq=0.0, rep=1.2, min_p=0.1, bias=[[5.0, -2.0]], lp=2, seen=[5, 6], np=1))]),
    m.Prefill(mb=0, id=8, seqs=[dataclasses.replace(SEQ, seed=None, key="r1.8", dst_blocks=[9])]),
    m.Admit(id=9, delivered=["t0.0"], seqs=[m.AdmitSeq(key="r1.8", blocks=[9], ntok=2)]),
    m.Reset(epoch=4, drop_keys=["r1.8"]),
    m.Restore(holder=["127.0.0.1", 4001], blocks=[3], seqs=[m.RestoreSeq(seq_id=1, blocks=[3], watermark=2)], replica=1,
              local=True),
    m.Preload(model="random:llama-tiny", dtype="float32", device="cpu", seed=0, tp=1, where="host",
              stages=[m.PreloadStage(rank=1, layers=[1, 2], tp_rank=0, local_rank=0)]),
    m.Rereplicate(id=4, blocks=[3, 4]), m.Replication(on=False, every=2),
    m.Hello(token="k", rank=0, pid=12, host="h"), m.Hello(token="k", standby=True),
    m.Hello(token="k", pid=12, host="h", addr="10.0.0.2", host_id="h/net:4026", local_rank=1, dist_port=29500),
    m.Fenced(rank=1, epoch=2),
    m.Ready(rank=0, load_s=0.5, pipe_port=1, replica_port=2, kv_port=3, ipc={"handle": b"\x00\x01"},
            weights="host"),
    m.Error(rank=None, msg="ValueError: x"), m.Heartbeat(rank=2),
    m.Tokens(mb=0, id=7, tokens=[1, 2], step_s=0.01),
    m.Tokens(mb=0, id=7, tokens=[1, 2], logprobs=[None, m.TokenLogprobs(lp=-0.5, top_ids=[2, 9], top_lps=[-0.5, -1.5])]),
    m.Pushed(rank=0, mb=0, id=8, bytes=10, exposed_s=0.0, compute_s=0.1, raw_s=0.0, transports=["tcp"],
             delivered=[], tokens=[3]),
    m.Admitted(rank=1, id=9, bytes=10, seconds=0.1), m.ResetDone(rank=1, epoch=4),
    m.Restored(rank=1, bad=[1], bytes=10, seconds=0.1, error="OSError: gone"),
    m.Replicated(rank=1, id=7, bytes=100, holder=1), m.Rereplicated(rank=1, id=4, bytes=100, error="refused"),
    m.SwapStats(rank=1, bytes_in=1, bytes_out=2, wait_s=0.0, step_s=0.1), m.StepFailed(rank=1, id=7, msg="broken"),
]


def _wire(msg) -> dict:
    return msgpack.unpackb(m.encode(msg), raw=False)


def test_every_kind_round_trips_and_carries_the_epoch():
    # the control protocol's kinds (the front-end link's, serving/engine_link.py, are tested with it)
    control = {t for t, cls in m.KINDS.items() if cls.__module__ == m.__name__}
    assert {type(x).t for x in EXAMPLES} == control, "an example per message kind"
    for msg in EXAMPLES:
        wire = _wire(msg)
        assert wire["t"] == msg.t and "epoch" in wire
        back = m.decode(m.encode(msg))
        assert type(back) is type(msg) and back == msg
    assert m.decode(m.encode(m.Reset(epoch=4, drop_keys=[]))).epoch == 4


def _pair() -> tuple[Channel, Channel]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return Channel(a, "a"), Channel(b, "b")


def test_the_channel_carries_typed_messages():
    ca, cb = _pair()
    try:
        for msg in EXAMPLES:
            ca.send(msg)
            assert cb.recv(5) == msg
        with pytest.raises(TypeError, match="not a control message"):
            ca.send({"t": "hb", "rank": 0})  # dicts do not go out as control messages
    finally:
        ca.close()
        cb.close()


def test_unknown_kinds_are_refused_by_name():
    with pytest.raises(m.MessageError, match="unknown control message kind 'launch_missiles'"):
        m.decode({"t": "launch_missiles"})
    with pytest.raises(m.MessageError, match="unknown control message kind 5"):
        m.decode({"t": 5})
    with pytest.raises(m.MessageError, match="must be a map"):
        m.decode(msgpack.packb([1, 2]))
    with pytest.raises(m.MessageError, match="undecodable"):
        m.decode(b"\xc1")


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: x.t)
def test_missing_extra_and_mistyped_fields_are_named(msg):
    wire = _wire(msg)
    with pytest.raises(m.MessageError, match=rf"^{msg.t}: unknown field 'bogus'$"):
        m.decode({**wire, "bogus": 1})
    hints = typing.get_type_hints(type(msg))
    for f in dataclasses.fields(msg):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            with pytest.raises(m.MessageError, match=rf"^{msg.t}: missing field '{f.name}'$"):
                m.decode({k: v for k, v in wire.items() if k != f.name})
        if hints[f.name] is not typing.Any:  # a value of the wrong type (1.5 fits no field but a float)
            bad = "fast" if float in (hints[f.name], *typing.get_args(hints[f.name])) else 1.5
            with pytest.raises(m.MessageError, match=rf"^{msg.t}: field '{f.name}'"):
                m.decode({**wire, f.name: bad})


def test_nested_records_and_list_items_are_checked_by_path():
    step = _wire(EXAMPLES[6])
    assert step["t"] == "step"
    bad = dict(step, seqs=[dict(step["seqs"][0], ids=[5, "six"])])
    with pytest.raises(m.MessageError, match=r"step: field 'seqs'\[0\]: field 'ids'\[1\] must be an integer, got str"):
        m.decode(bad)
    with pytest.raises(m.MessageError, match=r"step: field 'seqs'\[0\]: missing field 'blocks'"):
        m.decode(dict(step, seqs=[{k: v for k, v in step["seqs"][0].items() if k != "blocks"}]))
    with pytest.raises(m.MessageError, match=r"step: field 'seqs'\[0\]: unknown field 'zz'"):
        m.decode(dict(step, seqs=[dict(step["seqs"][0], zz=1)]))
    with pytest.raises(m.MessageError, match=r"step: field 'seqs'\[0\]: field 'x': field 'lp' must be an integer"):
        m.decode(dict(step, seqs=[dict(step["seqs"][0], x=dict(pres=0.0, freq=0.0, rep=1.0, min_p=0.0, bias=[],
                                                                 lp="all"))]))
    with pytest.raises(m.MessageError, match=r"step: field 'prefill' must be a boolean, got int"):
        m.decode(dict(step, prefill=1))
    with pytest.raises(m.MessageError, match=r"tokens: field 'tokens'\[0\] must be an integer, got bool"):
        m.decode({"t": "tokens", "mb": 0, "id": 1, "tokens": [True]})
    # an int where a float is expected is a number, and decodes as a float
    assert m.decode({"t": "tokens", "mb": 0, "id": 1, "tokens": [], "step_s": 1}).step_s == 1.0


def test_sampled_tokens_with_logprobs_pack_and_unpack():
    entries = [7, [3, [-0.25, [[3, -0.25], [4, -1.5]]]], 9]
    ids, lps = m.pack_tokens(entries)
    assert ids == [7, 3, 9] and lps[0] is None and lps[1].top_ids == [3, 4]
    back = m.decode(m.encode(m.Tokens(mb=0, id=1, tokens=ids, logprobs=lps)))
    assert m.unpack_tokens(back.tokens, back.logprobs) == entries
    assert m.pack_tokens([1, 2]) == ([1, 2], None) and m.unpack_tokens([1, 2], None) == [1, 2]
    with pytest.raises(m.MessageError, match="2 logprob entries for 3 tokens"):
        m.unpack_tokens([1, 2, 3], [None, None])


def test_every_message_sent_carries_the_senders_epoch():
    ca, cb = _pair()
    try:
        epoch = [0]
        ca.stamp = lambda: epoch[0]
        ca.send(m.Heartbeat(rank=1))
        epoch[0] = 3
        ca.send(m.Heartbeat(rank=1))
        assert ca.send_nowait(m.Fenced(rank=1))
        assert [cb.recv(5).epoch for _ in range(3)] == [0, 3, 3]
    finally:
        ca.close()
        cb.close()
