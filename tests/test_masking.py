"""Section 3: unmask() against a per-byte reference, on both sides of its size switch."""

import random
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import websockify_min
from websockify_min import unmask

SWITCH = websockify_min._TRANSLATE_FROM  # below: one big-int XOR; from here: 4 translates
SIZES = sorted(
    {0, 1, 2, 3, 4, 5, 7, 8, 125, 126, SWITCH - 5, SWITCH - 1, SWITCH, SWITCH + 1}
    | {SWITCH + 3, 2 * SWITCH, 4097, 65535, 65536, 65537}
)
MASKS = st.binary(min_size=4, max_size=4)


def reference(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """RFC 6455 section 5.3, byte by byte: octet i is XORed with mask[(offset + i) % 4]."""
    return bytes(b ^ mask[(offset + i) % 4] for i, b in enumerate(data))


def noise(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") if size else b""


def test_the_switch_is_inside_the_sizes_tested() -> None:
    assert 0 < SWITCH < max(SIZES)
    assert {SWITCH - 1, SWITCH, SWITCH + 1} <= set(SIZES)


@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("size", SIZES)
def test_unmask_matches_the_reference(size: int, offset: int) -> None:
    data, mask = noise(size, size), noise(4, offset + 1)
    assert bytes(unmask(data, mask, offset)) == reference(data, mask, offset)


@pytest.mark.parametrize("size", [0, 3, SWITCH - 1, SWITCH, 5000])
def test_unmask_accepts_every_buffer_type_and_leaves_the_input_alone(size: int) -> None:
    data, mask = noise(size + 10, 7), b"\x00\xff\x5a\xa5"
    expected = reference(data[5 : size + 5], mask, 2)
    buffer = bytearray(data)
    for chunk in (data[5 : size + 5], buffer[5 : size + 5], memoryview(buffer)[5 : size + 5]):
        assert bytes(unmask(chunk, mask, 2)) == expected
    assert buffer == data


def test_zero_mask_is_the_identity_and_offset_is_taken_modulo_4() -> None:
    data = noise(3000, 3)
    for size in (17, 3000):
        assert bytes(unmask(data[:size], b"\0\0\0\0", 5)) == data[:size]
        mask = b"\x01\x02\x03\x04"
        assert bytes(unmask(data[:size], mask, 1)) == bytes(unmask(data[:size], mask, 4 * 99 + 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3 * SWITCH), MASKS, st.integers(0, 1 << 40))
def test_unmask_is_the_reference_and_its_own_inverse(data: bytes, mask: bytes, offset: int) -> None:
    masked = bytes(unmask(data, mask, offset))
    assert masked == reference(data, mask, offset)
    assert bytes(unmask(masked, mask, offset)) == data


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.binary(max_size=600), st.integers(0, 5 * SWITCH).map(noise)),
    MASKS,
    st.lists(st.integers(0, 3 * SWITCH), max_size=12),
)
def test_piecewise_unmasking_with_offsets_equals_whole(
    data: bytes, mask: bytes, cuts: List[int]
) -> None:
    """A payload unmasked as it streams in, piece by piece, equals the payload unmasked at once."""
    bounds = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    pieces = [
        bytes(unmask(memoryview(data)[start:stop], mask, start))
        for start, stop in zip(bounds, bounds[1:])
    ]
    assert b"".join(pieces) == bytes(unmask(data, mask)) == reference(data, mask)
