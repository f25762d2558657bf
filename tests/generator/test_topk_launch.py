"""The decode top-k's launch parameters (fused_attention.head_tile, chunks_for) keep the
properties its kernels rely on, for every head layout and bank size a model can bring."""

from __future__ import annotations

import itertools

from services.generator import fused_attention as fa

HEADS = [(h, kvh) for h in (1, 2, 4, 6, 8, 12, 14, 16, 24, 28, 32, 40, 48, 64, 96, 128) for kvh in (1, 2, 4, 8, 16, 32)]


def test_head_tile_divides_the_group_and_bounds_the_lists():
    for (h, kvh), ls in itertools.product(HEADS, (8, 16, 32)):
        if h % kvh:
            continue
        group = h // kvh
        gt = fa.head_tile(h, kvh, ls)
        assert group % gt == 0 and h % gt == 0, (h, kvh, ls, gt)  # a tile's heads share one KV head
        assert gt * ls <= 64, (h, kvh, ls, gt)  # registers per lane
        assert not any(group % t == 0 and t * ls <= 64 for t in range(gt + 1, group + 1))  # the largest
    assert fa.head_tile(14, 2, 8) == 7 and fa.head_tile(14, 2, 16) == 1 and fa.head_tile(32, 4, 32) == 2


def test_chunks_for_caps_the_merge_and_keeps_rows_per_lane():
    tiles_ = (1, 2, 3, 7, 12, 64, 511, 1023, 4095, 4096, 5000)
    rows = (1, 31, 127, 128, 255, 256, 1000, 4096, 65536, 10**6)
    for tiles, n, k in itertools.product(tiles_, rows, (1, 3, 8, 10, 16, 31, 32)):
        k = min(k, n)
        c = fa.chunks_for(tiles, n, k)
        assert c >= 1
        if tiles >= fa._FILL_WARPS:
            assert c == 1
        if c > 1:
            assert c * k <= fa._MERGE_CANDIDATES, (tiles, n, k, c)  # the merge warp's candidates
            per = -(-n // c)
            assert per >= 32 * fa._ROWS_PER_LANE, (tiles, n, k, c)  # >= 4 rows a lane
            assert c <= -(-fa._FILL_WARPS // tiles)  # no more warps than fill the GPU
            # (a chunk may start past the bank's end, per = ceil(n / c): the scan writes it no
            # candidates; test_kernels_emulated.py's empty_chunks case)


def test_chunks_for_takes_an_empty_top_k():
    """k = min(top_k, rows) is 0 for an empty bank: one chunk, no division by zero."""
    assert fa.chunks_for(8, 0, 0) == 1 and fa.chunks_for(8, 4096, 0) >= 1
