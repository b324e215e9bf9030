"""GPU -> remote GPU over NCCL for KVStreamer (a destination with `device_direct`, e.g. a process
group channel): the region is gathered on the device in pieces of `peer_piece_bytes` into two
buffers and each piece is sent while the next one is gathered; the receiver scatters each piece
while the next arrives. `st` is the KVStreamer (its cache, layout, streams and copy rows)."""
from __future__ import annotations

import torch

from .. import _C
from .dist import _completion
from .futures import Future
from .region import Region


def _peer_buffers(st, d, piece: int):
    """The direction's two device buffers of `piece` bytes (kept for the next transfer)."""
    if d.peer_bufs is None or d.peer_bufs[0].numel() != piece:
        if d.peer_bufs is not None:
            torch.cuda.current_stream(st.device).wait_stream(d.kernel)
        d.peer_bufs = [torch.empty(piece, dtype=torch.uint8, device=st.device) for _ in range(2)]
        d.peer_last = [None, None]
    return d.peer_bufs


def out_peer(st, region: Region, ch, key: str, after) -> Future:
    """Gather pieces on the device (kernel stream) and send each over NCCL (issued from the comm
    stream, which waits only for that piece's gather) while the next one is gathered. A gather
    into a buffer first waits for the send that last read it (Work.wait() orders the stream, it
    does not block the host)."""
    with torch.cuda.device(st.device):
        d = st._out
        d.kernel.wait_event(after if after is not None else torch.cuda.current_stream(st.device).record_event())
        n = region.nbytes(st.layout)
        piece = st.peer_piece_bytes
        works = []
        # The header leaves first: the receiver waits for it before it posts its receives, so
        # building the copy rows here overlaps its flight instead of delaying it.
        with torch.cuda.stream(d.kernel):
            head = torch.tensor([n, piece], dtype=torch.int64, device=st.device)
        d.comm.wait_stream(d.kernel)
        with torch.cuda.stream(d.comm):
            works.append(ch.dist_isend(head))
        bufs = _peer_buffers(st, d, piece)
        desc, prow, pbytes, big = st._device_desc(region, True, piece, d.kernel)
        for i, pb in enumerate(pbytes):
            j = i % 2
            with torch.cuda.stream(d.kernel):
                if d.peer_last[j] is not None:
                    d.peer_last[j].wait()  # the send that last read this buffer (maybe an earlier transfer's)
                _C.cuda_copy_spans(st.flat.data_ptr(), bufs[j].data_ptr(), desc.data_ptr() + 24 * prow[i],
                                   prow[i + 1] - prow[i], d.kernel.cuda_stream, big)
                gathered = d.kernel.record_event()
            d.comm.wait_event(gathered)
            with torch.cuda.stream(d.comm):
                works.append(ch.dist_isend(bufs[j][:pb]))
            d.peer_last[j] = works[-1]
        return Future(f"stream_out {key!r} to rank {ch.peer} (NCCL)", parts=[_completion(works)],
                      keep=[desc, head, *bufs, st.cache.tensor], nbytes=n)


def in_peer(st, ch, key: str, region: Region) -> Future:
    """Receive pieces over NCCL into two device buffers (issued from the comm stream) and scatter
    each on the kernel stream while the next arrives: a receive into a buffer waits for the
    scatter that last read it, each scatter for its receive."""
    with torch.cuda.device(st.device):
        d = st._in
        n = region.nbytes(st.layout)
        head = torch.empty(2, dtype=torch.int64, device=st.device)
        with torch.cuda.stream(d.comm):
            got_head = ch.dist_irecv(head)
        # While the header is in flight: the copy rows for this side's own piece size (the
        # sender's, unless the two were configured differently; then they are rebuilt).
        guess = st.peer_piece_bytes
        rows = st._host_desc(region, False, guess) if n else None
        with torch.cuda.stream(d.comm):
            got_head.wait()
            sent, piece = (int(x) for x in head.tolist())
        if sent != n:
            return Future.failed(f"stream_in {key!r} from rank {ch.peer}",
                                 f"the sender streams {sent} bytes, the region holds {n}")
        if not 0 < piece <= 1 << 32:
            return Future.failed(f"stream_in {key!r} from rank {ch.peer}", f"bad piece size {piece}")
        if n == 0:
            return Future.completed(f"stream_in {key!r} from rank {ch.peer}")
        bufs = _peer_buffers(st, d, piece)
        desc, prow, pbytes, big = st._device_desc(region, False, piece, d.kernel,
                                                    rows if piece == guess else None)
        freed = [d.kernel.record_event(), d.kernel.record_event()]  # earlier scatters from each buffer

        def post(i):
            d.comm.wait_event(freed[i % 2])
            with torch.cuda.stream(d.comm):
                return ch.dist_irecv(bufs[i % 2][:pbytes[i]])
        recvs = [post(0)]
        for i in range(len(pbytes)):
            if i + 1 < len(pbytes):
                recvs.append(post(i + 1))
            with torch.cuda.stream(d.kernel):
                recvs[i].wait()
                _C.cuda_copy_spans(bufs[i % 2].data_ptr(), st.flat.data_ptr(), desc.data_ptr() + 24 * prow[i],
                                   prow[i + 1] - prow[i], d.kernel.cuda_stream, big)
                freed[i % 2] = d.kernel.record_event()
        evt = d.kernel.record_event()
        return Future(f"stream_in {key!r} from rank {ch.peer} (NCCL)", parts=[evt],
                      keep=[desc, head, *bufs, st.cache.tensor], nbytes=n, event=evt)
