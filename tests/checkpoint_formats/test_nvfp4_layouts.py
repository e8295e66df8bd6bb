"""The Gluon decode tile's byte layout against the wgmma register-fragment layout of the PTX ISA (pure Python)."""

from __future__ import annotations

import itertools
import math
import random
import struct

import pytest

from checkpoint_formats.nvfp4 import E2M1_VALUES
from checkpoint_formats.nvfp4_layouts import (
    byte_layout_bases,
    decoded_pair_bits,
    fragment_coordinates,
    prmt,
    wgmma_a_fragment,
    word_layout_bases,
)


@pytest.mark.parametrize(("block_n", "block_k"), [(64, 64), (128, 64), (128, 128), (16, 16)])
def test_each_thread_loads_the_bytes_of_its_own_fragment(block_n: int, block_k: int) -> None:
    bases = byte_layout_bases(block_n, block_k)
    registers, lanes, warps = (len(level) for level in bases)
    assert (1 << lanes, 1 << warps) == (32, block_n // 16)
    seen = set()
    groups = registers - 2
    for register, lane, warp in itertools.product(range(1 << registers), range(32), range(1 << warps)):
        row, group, half, byte = fragment_coordinates(bases, register, lane, warp)
        seen.add((row, group, half, byte))
        # register bit 0: k + 8 (fragment value bit 2), the last one: row + 8 (value bit 1), between: the 16-k group
        value = (register & 1) << 2 | (register >> (groups + 1) & 1) << 1
        k_group = register >> 1 & ((1 << groups) - 1)
        for nibble in (0, 1):  # the byte's two codes are the fragment's k pair (value bit 0)
            assert (row, 16 * group + 2 * (4 * half + byte) + nibble) == _shifted(
                wgmma_a_fragment(value | nibble, lane, warp), 16 * k_group)
    assert len(seen) == block_n * block_k // 2  # every byte of the tile, each once


@pytest.mark.parametrize(("block_n", "block_k"), [(64, 64), (128, 64)])
def test_a_thread_holds_the_words_of_its_bytes_in_consecutive_registers(block_n: int, block_k: int) -> None:
    byte_bases, word_bases = byte_layout_bases(block_n, block_k), word_layout_bases(block_n, block_k)
    for register, lane, warp in itertools.product(range(1 << len(byte_bases[0])), range(32), range(block_n // 16)):
        row, group, half, _ = fragment_coordinates(byte_bases, register, lane, warp)
        assert fragment_coordinates(word_bases, register, lane, warp) == (row, 2 * group + half)
    words_per_row = block_k // 8
    assert [fragment_coordinates(word_bases, r, 0, 0)[1] for r in range(words_per_row)] == list(range(words_per_row))


def _shifted(coordinate: tuple[int, int], k: int) -> tuple[int, int]:
    return coordinate[0], coordinate[1] + k


def test_fragment_reference_matches_the_ptx_table() -> None:
    """Spot values of PTX's "wgmma .m64nNk16 register fragment for A": thread 0 holds rows 0 and 8, k 0-1 and 8-9."""
    assert [wgmma_a_fragment(v, 0, 0) for v in range(8)] == [(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)]
    assert wgmma_a_fragment(0, 5, 0) == (1, 2) and wgmma_a_fragment(0, 0, 3) == (48, 0)


@pytest.mark.parametrize(("block_n", "block_k"), [(48, 64), (128, 8)])
def test_rejects_tiles_the_fragment_cannot_cover(block_n: int, block_k: int) -> None:
    with pytest.raises(ValueError, match="power of two of at least 16"):
        byte_layout_bases(block_n, block_k)


def _bf16_bits(value: float) -> int:
    """bf16 bits of a value that bf16 holds exactly (the top half of its fp32 bits)."""
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16


def test_prmt_follows_the_ptx_byte_rules() -> None:
    a, b = 0x44332211, 0x88776655
    assert prmt(a, b, 0x3210) == a and prmt(a, b, 0x7654) == b and prmt(a, b, 0x0415) == 0x11552266
    assert prmt(a, b, 0x000F) == 0x111111FF  # bit 3: byte 7 (0x88) sign-replicated
    assert prmt(a, b, 0x0008) == 0x11111100  # byte 0 (0x11) has no sign bit


def test_each_byte_decodes_to_its_two_codes_as_bf16_times_2_to_the_minus_126() -> None:
    """The Gluon tile's pair decode, every byte value at every position, with random neighbours (the shift by 4
    pulls the neighbouring byte's bits in; the masks must drop them)."""
    rng = random.Random(0)
    signed = [math.copysign(abs(float(E2M1_VALUES[code])), -1.0 if code & 8 else 1.0) for code in range(16)]
    expected = [_bf16_bits(value * 2.0**-126) for value in signed]
    assert expected[1] == 0x0040 and expected[8] == 0x8000  # subnormal 0.5; code 8 is -0
    for c, byte in itertools.product(range(4), range(256)):
        for _ in range(4):
            word = (rng.getrandbits(32) & ~(0xFF << 8 * c)) | byte << 8 * c
            bits = decoded_pair_bits(word, c)
            assert (bits & 0xFFFF, bits >> 16) == (expected[byte & 0xF], expected[byte >> 4]), (hex(word), c)
