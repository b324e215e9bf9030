"""dejavu._C: layouts and host gather/scatter from Python, against torch indexing."""
import pytest
import torch

from dejavu import _C
from dejavu.engine.kv_cache import PagedKVCache


def test_layout_matches_the_torch_cache():
    cache = PagedKVCache(3, 10, 4, 2, 8, torch.float16, torch.device("cpu"))
    layout = cache.layout()
    assert layout.total_bytes() == cache.nbytes
    t = cache.tensor
    base = t.data_ptr()
    assert layout.chunk_offset(2, 7) == t[2, 7].data_ptr() - base
    assert layout.token_offset(1, 3, 2, 1) == t[1, 3, 1, 2].data_ptr() - base


def test_gather_scatter_round_trip_random_blocks():
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(4, 32, 16, 2, 8, torch.float32, torch.device("cpu"))
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=g))
    layers, blocks = [3, 1], torch.randperm(32, generator=g)[:9].tolist()
    spans = _C.chunk_spans(cache.layout(), layers, blocks)
    nbytes = sum(b for _, b in spans)
    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    assert _C.host_gather(cache.tensor.data_ptr(), spans, buf.data_ptr()) == nbytes
    expect = torch.cat([cache.tensor[l, blocks].reshape(-1) for l in layers])
    assert torch.equal(buf, expect)
    other = PagedKVCache(4, 32, 16, 2, 8, torch.float32, torch.device("cpu"))
    _C.host_scatter(other.tensor.data_ptr(), spans, buf.data_ptr())
    for l in layers:
        assert torch.equal(other.tensor[l, blocks], cache.tensor[l, blocks])
    untouched = [b for b in range(32) if b not in blocks]
    assert not other.tensor[:, untouched].any()


def test_bad_layout_and_indices_raise():
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        _C.KVLayout(2, 0, 16, 2, 8, 2)
    layout = _C.KVLayout(2, 4, 16, 2, 8, 2)
    with pytest.raises(IndexError, match="block 4 out of range"):
        _C.chunk_spans(layout, [0], [4])
    with pytest.raises(ValueError, match="negative"):
        _C.host_gather(0, [(-1, 4)], 0)


def test_crc32c_known_value():
    data = torch.tensor(list(b"123456789"), dtype=torch.uint8)
    assert _C.crc32c(data.data_ptr(), 9) == 0xE3069283


def test_cuda_build_flags_are_consistent():
    assert isinstance(_C.cuda_compiled(), bool)
    if not _C.cuda_compiled():
        assert _C.cuda_device_count() == 0
        with pytest.raises(RuntimeError, match="without CUDA"):
            _C.cuda_copy_spans(0, 0, 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case is tests/test_kernels_cuda.py's")
def test_programmatic_launch_is_not_active_without_a_device():
    """With the setting on, a machine without a CUDA device (or a build without CUDA) reports that
    no kernel launches with programmatic launch."""
    try:
        _C.set_programmatic_launch(1)
        assert not _C.programmatic_launch_active()
    finally:
        _C.set_programmatic_launch(-1)
