"""The address model of DéjàVuLib's listeners: bind 127.0.0.1 unless told, advertise the bind
address unless told, and never advertise (or silently accept) a wildcard."""
import socket

import pytest
import torch

from dejavu.kvstream import KVStreamer, TcpDest, TcpReplicaServer
from dejavu.kvstream.net import Address, advertised, parse_host_port
from dejavu.kvstream.replica import ReplicaClient, ReplicaServer
from dejavu.kvstream.transports import new_cluster_token
from dejavu.parallel.pipe import StagePipes
from kv_helpers import empty_like, filled_cache, region_values
from kv_peer import REGION


def test_defaults_bind_and_advertise_loopback():
    token = new_cluster_token()
    rs, ts, sp = ReplicaServer(token), TcpReplicaServer(token), StagePipes(token, 0, timeout=5)
    try:
        assert rs._listener.getsockname()[0] == "127.0.0.1" and rs.address == ("127.0.0.1", rs.port)
        assert sp._listener.getsockname()[0] == "127.0.0.1" and sp.address == ("127.0.0.1", sp.port)
        assert ts.address == ("127.0.0.1", ts.port)
    finally:
        rs.stop()
        ts.stop()
        sp.close()


@pytest.mark.parametrize("make", [
    lambda t: ReplicaServer(t, "0.0.0.0"),
    lambda t: TcpReplicaServer(t, host="0.0.0.0"),
    lambda t: StagePipes(t, 0, "0.0.0.0"),
])
def test_a_wildcard_bind_needs_an_advertised_address(make):
    with pytest.raises(ValueError, match="wildcard.*advertised"):
        make(new_cluster_token())


def test_wildcard_bind_with_an_advertised_address_carries_kv():
    token = new_cluster_token()
    srv = TcpReplicaServer(token, host="0.0.0.0", advertise="127.0.0.1")
    holder = ReplicaServer(token, "0.0.0.0", advertise="localhost")
    try:
        assert srv.address.host == "127.0.0.1" and holder.address.host == "localhost"
        src = filled_cache(seed=3)
        KVStreamer(src).stream_out(REGION, TcpDest(*srv.address, token), "k").wait(30)
        dst = empty_like(src)
        KVStreamer(dst).stream_in(TcpDest(*srv.address, token), "k", REGION).wait(30)
        assert torch.equal(region_values(dst, REGION), region_values(src, REGION))
        c = ReplicaClient(*holder.address, token)
        c.open("w0", (2, 4, 2, 4, 2, 8), torch.float32)
        c.close()
        assert "w0" in holder.mirrors
    finally:
        srv.stop()
        holder.stop()


def test_advertising_a_wildcard_is_refused():
    with pytest.raises(ValueError, match="cannot advertise"):
        advertised("127.0.0.1", "0.0.0.0")
    assert advertised("10.0.0.2") == "10.0.0.2" and advertised("0.0.0.0", "h1") == "h1"


def test_host_port_parsing():
    assert parse_host_port("10.1.2.3:80") == Address("10.1.2.3", 80)
    assert parse_host_port("[::1]:9") == Address("::1", 9) and str(Address("::1", 9)) == "[::1]:9"
    for bad in ("10.1.2.3", ":80", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_host_port(bad)


def test_free_port_is_free_on_the_given_host():
    from dejavu.cluster.launch import free_port

    port = free_port("127.0.0.1")
    with socket.create_server(("127.0.0.1", port)):
        pass
