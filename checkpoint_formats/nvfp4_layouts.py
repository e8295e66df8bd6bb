"""Where each code byte of an NVFP4 weight tile lives in a Hopper wgmma's register operand (pure functions).

Why: ``nvfp4_gluon_decode`` loads code bytes straight into the threads whose wgmma fragment holds their two
weights, so no decoded tile moves between threads. The layout is a list of linear-layout bases (Gluon's
``DistributedLinearLayout``): these functions build them, and ``fragment_coordinates`` / ``wgmma_a_fragment``
let a CPU test check them against the fragment layout of PTX's ``wgmma.mma_async`` (16-bit A in registers).

Tile coordinates: a [BLOCK_N, BLOCK_K] weight tile, as code bytes: byte b (0-7) of a 16-k group holds
k = 16 * group + 2b (low nibble) and 2b + 1 (high nibble), as ModelOpt packs them; as uint32 words, word
w = 2 * group + h holds bytes 4h..4h+3 of the group.
"""

from __future__ import annotations




def byte_layout_bases(block_n: int, block_k: int) -> tuple:
    """(register, lane, warp) bases of the code bytes as [block_n, block_k / 16, 2, 4] (row, 16-k group, word
    half h, byte c of the word: byte b = 4h + c of the group), block_n / 16 warps.

    A fragment register pair holds k = 2b, 2b + 1 of one row, so a register holds one byte; lanes' low two bits
    pick c and their high three bits the row mod 8; registers pick h (k + 8), the group and row bit 3, in that
    order, so that a thread's words of one row (w = 2 * group + h) are consecutive registers (one wide load);
    warps pick rows in steps of 16.
    """
    for name, size in (("block_n", block_n), ("block_k", block_k)):  # no helpers: Triton compiles this in a kernel
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two of at least 16, got {size}")
    registers = ([[0, 0, 1, 0]] + [[0, 1 << bit, 0, 0] for bit in range((block_k // 16).bit_length() - 1)]
                 + [[8, 0, 0, 0]])  # fmt: skip
    lanes = [[0, 0, 0, 1], [0, 0, 0, 2], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    warps = [[16 << bit, 0, 0, 0] for bit in range((block_n // 16).bit_length() - 1)]
    return registers, lanes, warps


def word_layout_bases(block_n: int, block_k: int) -> tuple:
    """The same threads' view of the code words [block_n, block_k / 8]: each thread holds all of its rows' words
    (the four lanes that share a row read the same words: their bytes differ), consecutive words in consecutive
    registers."""
    words = (block_k // 8).bit_length() - 1  # self-contained (no calls): Triton compiles this in a kernel
    registers = [[0, 1 << bit] for bit in range(words)] + [[8, 0]]
    lanes = [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]]
    return registers, lanes, [[16 << bit, 0] for bit in range((block_n // 16).bit_length() - 1)]


def fragment_coordinates(bases: tuple, register: int, lane: int, warp: int) -> tuple[int, ...]:
    """The tensor coordinate that (register, lane, warp) holds: the XOR of the bases of its set bits."""
    coordinate = None
    for level, index in zip(bases, (register, lane, warp)):
        for bit, basis in enumerate(level):
            if coordinate is None:
                coordinate = [0] * len(basis)
            if index >> bit & 1:
                coordinate = [c ^ b for c, b in zip(coordinate, basis)]
    return tuple(coordinate or ())


def wgmma_a_fragment(value: int, lane: int, warp: int) -> tuple[int, int]:
    """(row, k) of element ``value`` (0-7) of a 16-bit wgmma A fragment in one m64 x k16 step (PTX ISA,
    "Register fragment for matrix A"): rows 16 * warp + lane / 4 (+ 8), k 2 * (lane % 4) + (0, 1) (+ 8)."""
    row = 16 * warp + lane // 4 + 8 * (value >> 1 & 1)
    k = 2 * (lane % 4) + (value & 1) + 8 * (value >> 2 & 1)
    return row, k


# How a thread turns byte c of a code word into its bf16x2 fragment register (``nvfp4_gluon_decode._BYTE_ASM``,
# five instructions a pair). prmt takes bytes from the word (selector nibbles 0-3) and from word << WORD_SHIFT
# (4-7); a nibble's bit 3 replaces the byte by its sign bit, replicated. Selector nibble i is
# PAIR_SELECT_BASE's nibble i + c: byte 0 = byte c of word << 4 (the low code in bits 4-7), byte 1 = its sign,
# byte 2 = byte c of the word (the high code in bits 4-7), byte 3 = its sign. Shifted left by PAIR_SHIFT and
# masked, each half has its code's three magnitude bits at 6-8 (a bf16's mantissa top bit and the exponent's
# two low bits: the E2M1 value * 2^-126, subnormal codes included) and its sign at 15.
WORD_SHIFT = 4
PAIR_SELECT_BASE = 0x80C4
PAIR_SHIFT = 2
PAIR_MASK = 0x81C081C0


def pair_selector(c: int) -> int:
    """prmt's selector for byte c (0-3) of a word."""
    return PAIR_SELECT_BASE + c * 0x1111


def prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32`` (default mode) on 32-bit ints: bytes 0-3 of a, 4-7 of b; selector bit 3 of a nibble
    replicates the chosen byte's sign bit."""
    source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nibble = (selector >> 4 * i) & 0xF
        byte = source[nibble & 7]
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def decoded_pair_bits(word: int, c: int) -> int:
    """The bf16x2 bits (low half: byte c's low code) that ``_BYTE_ASM`` makes before its multiply by the scale."""
    shifted = (word << WORD_SHIFT) & 0xFFFFFFFF
    return ((prmt(word, shifted, pair_selector(c)) << PAIR_SHIFT) & 0xFFFFFFFF) & PAIR_MASK
