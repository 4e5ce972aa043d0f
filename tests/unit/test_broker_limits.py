"""The packet-size bound of the embedded broker follows MQTT framing (§2.2.3), without a network."""

from __future__ import annotations

import asyncio

import pytest

from broker.embedded import _BoundedReader


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(body_len: int) -> bytes:
    return b"\x30" + remaining_length(body_len) + b"x" * body_len


async def read_like_amqtt(reader: _BoundedReader) -> int:
    """Read one packet the way amqtt does: type byte, length bytes one by one, then the body."""
    await reader.read(1)
    length, multiplier = 0, 1
    while True:
        byte = (await reader.read(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    if length:
        await reader.read(length)
    return length


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("sizes", [[0, 10, 127, 128, 16383, 16384], [1000] * 5])
async def test_packets_within_the_limit_pass_unchanged(sizes: list[int]) -> None:
    data = b"".join(packet(n) for n in sizes)
    reader = _BoundedReader(stream(data[1:]), data[:1], limit=16384)
    assert [await read_like_amqtt(reader) for _ in sizes] == sizes
    assert reader.oversize is None


async def test_a_packet_above_the_limit_ends_the_stream_before_its_body() -> None:
    data = packet(10) + packet(5000) + packet(10)
    reader = _BoundedReader(stream(data), b"", limit=4096)
    assert await read_like_amqtt(reader) == 10
    with pytest.raises(asyncio.IncompleteReadError):
        await read_like_amqtt(reader)
    assert reader.oversize == 5000
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(1)


async def test_a_five_byte_length_is_refused() -> None:
    reader = _BoundedReader(stream(b"\x30\xff\xff\xff\xff\x01"), b"", limit=2**30)
    with pytest.raises(asyncio.IncompleteReadError):
        await read_like_amqtt(reader)
    assert reader.oversize is not None
