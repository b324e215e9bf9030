"""The deployment's internal channels under attack: real processes and sockets. No secret on any
command line; every listening port (controller, stage pipes, replica holders, KV receive stores)
refuses garbage, truncated frames, huge length prefixes and wrong tokens without allocating or
dying, and the deployment goes on answering with the same tokens."""
import ctypes
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch

from dejavu import LLM, SamplingParams, _C
from dejavu.kvstream.replica import ReplicaClient, ReplicaServer
from dejavu.kvstream.transports import TcpReplicaServer, new_cluster_token
from dejavu.parallel.auth import Acceptor, TokenError, read_token
from dejavu.parallel.wire import connect

MODEL = "random:llama-tiny"
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


def _frame(msg) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """The peer closed the connection (EOF or reset) within `seconds`, whatever it answered first."""
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not sock.recv(1 << 16):
                return True
    except ConnectionError:
        return True
    except socket.timeout:
        return False
    return False


GARBAGE = {
    "random bytes": os.urandom(256),
    "truncated frame": struct.pack(">I", 100) + b"\x81\xa1t",
    "huge length prefix": struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 16,
}


def _store_header(type_: int, payload_len: int) -> bytes:
    """A TcpStore frame header (tcp_store.h) with valid magic, version and header checksum."""
    head = bytearray(struct.pack("<IHHIIQ", 0x54564A44, 2, type_, 0, 0, payload_len))
    buf = (ctypes.c_char * len(head)).from_buffer(head)
    return bytes(head) + struct.pack("<II", _C.crc32c(ctypes.addressof(buf), 24), 0)


def _attack(port: int, token_frame: bytes, huge: bytes | None = None) -> None:
    """Each kind of garbage on its own connection; the listener must close every one of them."""
    garbage = dict(GARBAGE, **({"huge length prefix": huge} if huge else {}))
    for what, data in {**garbage, "wrong token": token_frame}.items():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            if what != "truncated frame":  # a truncated one waits for the rest until the deadline
                assert _closed_within(s, 12), f"port {port} kept a connection that sent {what}"


def _cmdlines() -> dict[int, str]:
    """argv of every process of ours (the engine's workers and spares are our children)."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def test_every_internal_port_refuses_garbage_and_the_deployment_goes_on():
    """Disaggregated and replicated, so every kind of internal port exists: the controller's, each
    worker's pipe and replica holder, and the token workers' KV receive stores."""
    llm = LLM(model=MODEL, prompt_stages=1, token_stages=2, block_size=4, kv_cache_blocks=64, worker_timeout=60,
              replicate=True)
    eng = llm.engine
    try:
        before = llm.generate([PROMPT], GREEDY)[0].token_ids
        pids = {r: i["pid"] for r, i in eng.worker_info.items()}
        # No worker (nor warm spare) has the token on its command line.
        mine = {pid: cmd for pid, cmd in _cmdlines().items() if "dejavu worker" in cmd and eng.controller_addr in cmd}
        assert set(pids.values()) <= set(mine), (pids, mine)
        assert not any(eng.token in cmd for cmd in mine.values()), mine

        # The controller: malformed HELLOs with the right token are refused, the engine lives.
        for bad in ({"rank": "x"}, {"rank": -1}, {"rank": 10 ** 12}, {"rank": True}, {"rank": 1.5},
                    {"standby": "yes"}, {"rank": 0, "pid": "me"}, {"addr": 5}, {"local_rank": "0"}):
            with pytest.raises(ConnectionError, match="malformed hello"):
                connect("127.0.0.1", eng.port, eng.token, bad, timeout=5)
        connect("127.0.0.1", eng.port, eng.token, {}, timeout=5).close()  # no rank: welcomed as a standby
        with pytest.raises(ConnectionError, match="bad cluster token"):
            connect("127.0.0.1", eng.port, "0" * 32, {"rank": 0}, timeout=5)
        _attack(eng.port, _frame({"t": "hello", "token": "0" * 32, "rank": 0}))
        ports = {"pipe": [i["pipe_port"] for i in eng.worker_info.values() if "pipe_port" in i],
                 "replica": [i["replica_port"] for i in eng.worker_info.values() if "replica_port" in i],
                 "kv": [i["kv_port"] for i in eng.worker_info.values() if "kv_port" in i]}
        assert all(ports.values()), ports
        for port in ports["pipe"]:
            _attack(port, _frame({"token": "0" * 32, "epoch": 0, "rank": 0}))
        for port in ports["replica"]:
            _attack(port, _frame({"t": "hello", "token": "0" * 32, "n": 16 << 30}))
        for port in ports["kv"]:
            bad = _C.TcpStoreClient  # a well-formed HELLO frame with the wrong token: refused
            with pytest.raises(ConnectionError, match="bad cluster token"):
                bad("127.0.0.1", port, "0" * 32, 5.0)
            token = (ctypes.c_char * 4).from_buffer(bytearray(b"0000"))  # its checksum trails it
            wrong = b"0000" + struct.pack("<I", _C.crc32c(ctypes.addressof(token), 4, 0))
            _attack(port, _store_header(1, 4) + wrong, huge=_store_header(1, 1 << 40))
        time.sleep(0.5)
        eng.idle_check()
        assert llm.generate([PROMPT], GREEDY)[0].token_ids == before
        assert eng.fault_tolerance()["failures"] == 0
        assert {r: i["pid"] for r, i in eng.worker_info.items()} == pids
    finally:
        llm.shutdown()


def test_respawned_worker_has_no_token_on_its_command_line():
    llm = LLM(model=MODEL, pp=2, block_size=4, kv_cache_blocks=64, worker_timeout=60, spare_workers=0)
    eng = llm.engine
    try:
        before = llm.generate([PROMPT], GREEDY)[0].token_ids
        os.kill(eng.worker_info[1]["pid"], 9)
        assert llm.generate([PROMPT], GREEDY)[0].token_ids == before
        new = eng.worker_info[1]["pid"]
        with open(f"/proc/{new}/cmdline", "rb") as f:
            cmd = f.read()
        assert b"worker" in cmd and eng.token.encode() not in cmd
    finally:
        llm.shutdown()


def test_worker_refuses_a_token_on_its_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dejavu", "worker", "--controller", "127.0.0.1:9", "--token", "abc"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "DEJAVU_CLUSTER_TOKEN" in r.stderr, r.stderr
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    with pytest.raises(TokenError, match="readable by other users"):
        read_token(str(path))
    path.chmod(0o600)
    assert read_token(str(path)) == "s3cret"
    env = {k: v for k, v in os.environ.items() if k != "DEJAVU_CLUSTER_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "dejavu", "worker", "--controller", "127.0.0.1:9", "--rank", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "no cluster token" in r.stderr, r.stderr


def test_silent_client_does_not_block_others_and_is_dropped():
    """The controller's acceptor: a client that connects and says nothing holds no one up, and is
    dropped at the auth deadline."""
    token = new_cluster_token()
    listener = socket.create_server(("127.0.0.1", 0))
    acc = Acceptor(listener, token, world=2, deadline=1.0)
    port = listener.getsockname()[1]
    try:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        dripping = socket.create_connection(("127.0.0.1", port))
        dripping.sendall(struct.pack(">I", 40))
        t0 = time.monotonic()
        ch = connect("127.0.0.1", port, token, {"rank": 1, "pid": 1, "host": "h"}, timeout=5)
        assert time.monotonic() - t0 < 0.5
        got, hello = acc.get(2.0)
        assert hello.rank == 1
        for s in silent + [dripping]:
            assert _closed_within(s, 3.0), "a silent connection outlived the auth deadline"
        deadline = time.monotonic() + 2  # counted just after the close the client saw
        while acc.refused < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert acc.refused >= 4
        ch.close()
        got.close()
    finally:
        acc.close()
        listener.close()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_tcp_store_survives_many_short_connections():
    """Finished connection threads are reaped (they used to pile up until the process aborted), and
    connections beyond the cap are closed at once."""
    token = new_cluster_token()
    srv = TcpReplicaServer(token)
    try:
        base = _threads()
        for i in range(400):
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                if i % 3 == 0:
                    s.sendall(os.urandom(40))
        deadline = time.monotonic() + 10
        while srv.stats().active and time.monotonic() < deadline:
            time.sleep(0.05)
        # active counts threads not yet joined: it was the number of connections ever made
        assert srv.stats().active == 0 and _threads() <= base + 4
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(300)]
        time.sleep(1.0)
        st = srv.stats()
        assert st.active <= 256 and st.refused_connections >= 300 - 256, (st.active, st.refused_connections)
        assert _threads() <= base + 256 + 4
        for s in idle:
            s.close()
        cli = _C.TcpStoreClient("127.0.0.1", srv.port, token, 5.0)
        data = torch.arange(64, dtype=torch.uint8)
        cli.put("k", data.data_ptr(), data.numel())
        out = torch.empty(64, dtype=torch.uint8)
        assert cli.get("k", out.data_ptr(), 64) == 64 and torch.equal(out, data)
        assert srv.stats().connections >= 700
    finally:
        srv.stop()


def test_replica_holder_allocates_nothing_before_the_token():
    """A HELLO announcing a 16 GiB payload (the old code allocated it before the token check) is
    closed at once, whatever the token; the holder still serves its members."""
    token = new_cluster_token()
    srv = ReplicaServer(token)
    try:
        for tok in ("0" * 32, token):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                s.sendall(_frame({"t": "hello", "token": tok, "n": 16 << 30}))
                assert _closed_within(s, 2.0)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(struct.pack(">I", 64 << 20))  # a header far over the HELLO cap
            assert _closed_within(s, 2.0)
        cli = ReplicaClient("127.0.0.1", srv.port, token)
        cli.open("s0.0", (1, 2, 2, 1, 1, 4), torch.float32)
        cli.close()
    finally:
        srv.stop()


def test_worker_channel_garbage_from_many_threads_at_once():
    """Many garbage clients at once on the controller's port do not stop a good one from joining."""
    token = new_cluster_token()
    listener = socket.create_server(("127.0.0.1", 0))
    acc = Acceptor(listener, token, world=1, deadline=2.0)
    port = listener.getsockname()[1]
    errors = []

    def spam():
        try:
            for data in GARBAGE.values():
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(data)
        except OSError as e:
            errors.append(e)
    threads = [threading.Thread(target=spam) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        ch = connect("127.0.0.1", port, token, {"standby": True}, timeout=5)
        _, hello = acc.get(5.0)
        assert hello.standby is True
        ch.close()
    finally:
        for t in threads:
            t.join()
        acc.close()
        listener.close()
