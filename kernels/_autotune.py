"""Autotune pieces the kernels share: the coarse sequence key, and the config list and
shared-memory prune of the two block-sparse kernels (vertical_slash, blockwise)."""

from __future__ import annotations

import triton

from ._inputs import INTERPRET


def seq_bucket(seq: int) -> int:
    """Autotune key: next power of two, so a new prompt length reuses the tuned config."""
    return 1 << max(seq - 1, 0).bit_length()


def block_sparse_configs() -> list[triton.Config]:
    """Configs of the block-sparse kernels (their tile is the selection's block size, not tuned)."""
    if INTERPRET:  # the interpreter would run every config: give it one
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (4, 3), (8, 3), (8, 1))]


def prune_block_sparse(configs, named_args, **kwargs):
    """head_dim 256 with 128-wide tiles: 2+ stages of K/V tiles exceed the 228 KB of an H100. The
    tile is ``TILE`` where the kernel has one (vertical_slash), else the selection's ``BLOCK``."""
    if kwargs.get("HEAD_DIM", 0) > 128 and kwargs.get("TILE", kwargs.get("BLOCK", 0)) >= 64:
        return [c for c in configs if c.num_stages == 1] or configs[:1]
    return configs
