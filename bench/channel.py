"""``dwcp bench channel --json``: bulk throughput of one secure channel vs raw trio TCP.

Both runs move the same bytes over a real loopback TCP connection, both ends in
this process:

* ``raw_tcp``: the sender writes 1 MiB buffers with ``send_all``; the receiver
  reads with ``recv_into`` into a reused buffer;
* ``channel``: a :class:`mesh.channel.SecureChannel` pair after a real handshake
  over the same socket type; every 1 MiB chunk becomes one length-prefixed
  secretstream frame (:func:`mesh.channel.frame` layout). Encryption runs in a
  worker thread on the sending side and decryption in another on the receiving
  side (``trio.to_thread``; PyNaCl's cffi calls release the GIL), each pipelined
  with the socket I/O through a short queue, so on two cores the two crypto
  stages run in parallel with each other and with the kernel's copying.

The receiver checks that the first chunk decrypts to what was sent and that the
stream ends with the sender's final frame, so the figure is for authenticated,
correctly decrypted data.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mesh import identity
from mesh.channel import ChannelError, Closed, Data, FrameReader, SecureChannel, frame

__all__ = ["register", "measure"]

#: 1 MiB frames: large enough that per-frame costs (two syscalls, a thread hop, a
#: tag) are negligible, and the chunk size DESIGN.md gives AMST.
DEFAULT_FRAME = 1024 * 1024
#: Frames in flight between a crypto stage and its socket stage: two keeps both
#: busy (one being transformed, one on the wire) without holding much memory.
PIPELINE_DEPTH = 2
_HOST = "127.0.0.1"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("channel", help="secure channel vs raw TCP bulk throughput on loopback")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument(
        "--size-mib", type=int, default=1024, help="bytes to move per run, MiB (default 1024)"
    )
    p.add_argument("--frame-kib", type=int, default=DEFAULT_FRAME // 1024, help="frame size, KiB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.size_mib < 1 or not 1 <= args.frame_kib <= 4096:
        print("dwcp bench channel: --size-mib must be >= 1 and --frame-kib in 1..4096")
        return 2
    result = measure(args.size_mib * 1024 * 1024, args.frame_kib * 1024)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def measure(size: int, frame_size: int = DEFAULT_FRAME) -> dict[str, Any]:
    chunk = os.urandom(frame_size)
    frames = max(1, size // frame_size)
    total = frames * frame_size
    cpu0 = time.process_time()
    raw_s = trio.run(_timed_pair, _raw_send, _raw_receive, chunk, frames)
    cpu1 = time.process_time()
    channel_s = trio.run(_timed_pair, _channel_send, _channel_receive, chunk, frames)
    cpu2 = time.process_time()
    mb = total / 1e6
    return {
        "bench": "channel",
        "bytes": total,
        "frame_bytes": frame_size,
        "frames": frames,
        "raw_tcp_seconds": round(raw_s, 6),
        "channel_seconds": round(channel_s, 6),
        "raw_tcp_MBps": round(mb / raw_s, 1),
        "channel_MBps": round(mb / channel_s, 1),
        "ratio": round(raw_s / channel_s, 3),
        # CPU seconds of the whole process (every thread, both ends): the cost of a run
        # independent of how many cores it got on a shared machine.
        "raw_tcp_cpu_seconds": round(cpu1 - cpu0, 3),
        "channel_cpu_seconds": round(cpu2 - cpu1, 3),
        "cipher": "XChaCha20-Poly1305 secretstream (libsodium via PyNaCl)",
        "cpus": os.cpu_count(),
    }


Sender = Callable[[trio.SocketStream, bytes, int, dict[str, Any]], Awaitable[None]]
Receiver = Callable[[trio.SocketStream, bytes, int, dict[str, Any]], Awaitable[None]]


async def _timed_pair(send: Sender, receive: Receiver, chunk: bytes, frames: int) -> float:
    """Connect a loopback pair, run ``send`` and ``receive`` concurrently; seconds taken."""
    listeners = await trio.open_tcp_listeners(0, host=_HOST)
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream(_HOST, port)
    server = await listener.accept()
    await listener.aclose()
    shared: dict[str, Any] = {}
    if send is _channel_send:
        await _handshake(client, server, shared)
    async with client, server:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, chunk, frames, shared)
            nursery.start_soon(receive, server, chunk, frames, shared)
        return time.perf_counter() - start


async def _recv_exactly(sock: trio.socket.SocketType, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await sock.recv_into(view[got:])
        if n == 0:
            raise ChannelError("truncated", f"connection closed after {got} of {len(view)} bytes")
        got += n


# --------------------------------------------------------------------------- raw TCP


async def _raw_send(
    stream: trio.SocketStream, chunk: bytes, frames: int, _: dict[str, Any]
) -> None:
    for _i in range(frames):
        await stream.send_all(chunk)


async def _raw_receive(
    stream: trio.SocketStream, chunk: bytes, frames: int, _: dict[str, Any]
) -> None:
    buf = memoryview(bytearray(len(chunk)))
    for _i in range(frames):
        await _recv_exactly(stream.socket, buf)


# --------------------------------------------------------------------------- secure channel


async def _handshake(
    client: trio.SocketStream, server: trio.SocketStream, shared: dict[str, Any]
) -> None:
    a_id, b_id = identity.generate(), identity.generate()
    peers = {"bench-a": a_id.public, "bench-b": b_id.public}
    a = SecureChannel(
        identity=a_id,
        name="bench-a",
        federation="bench",
        peers=peers,
        versions=(1, 3),
        initiator=True,
        peer="bench-b",
    )
    b = SecureChannel(
        identity=b_id,
        name="bench-b",
        federation="bench",
        peers=peers,
        versions=(1, 3),
        initiator=False,
    )
    readers = {id(a): FrameReader(), id(b): FrameReader()}
    # Three handshake frames, alternating directions, over the real sockets.
    for sender, stream_out, receiver, stream_in in (
        (a, client, b, server),
        (b, server, a, client),
        (a, client, b, server),
    ):
        for f in sender.frames_to_send():
            await stream_out.send_all(frame(f))
        frames: list[bytes] = []
        while not frames:
            frames = readers[id(receiver)].feed(await stream_in.receive_some())
        for f in frames:
            receiver.receive_frame(f)
    if not (a.is_open and b.is_open):
        raise ChannelError("malformed", "the benchmark handshake did not complete")
    shared["sender"], shared["receiver"] = a, b


async def _channel_send(
    stream: trio.SocketStream, chunk: bytes, frames: int, shared: dict[str, Any]
) -> None:
    channel: SecureChannel = shared["sender"]
    to_wire, from_crypto = trio.open_memory_channel[bytes](PIPELINE_DEPTH)

    async def encrypt() -> None:
        async with to_wire:
            for _i in range(frames):
                await to_wire.send(await trio.to_thread.run_sync(channel.send, chunk))
            await to_wire.send(channel.close())

    async def write() -> None:
        async with from_crypto:
            async for ciphertext in from_crypto:
                await stream.send_all(len(ciphertext).to_bytes(4, "big"))
                await stream.send_all(ciphertext)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(encrypt)
        nursery.start_soon(write)


async def _channel_receive(
    stream: trio.SocketStream, chunk: bytes, frames: int, shared: dict[str, Any]
) -> None:
    channel: SecureChannel = shared["receiver"]
    to_crypto, from_wire = trio.open_memory_channel[bytearray](PIPELINE_DEPTH)
    sock = stream.socket

    async def read() -> None:
        header = memoryview(bytearray(4))
        async with to_crypto:
            for _i in range(frames + 1):  # the data frames and the final frame
                await _recv_exactly(sock, header)
                body = bytearray(int.from_bytes(header, "big"))
                await _recv_exactly(sock, memoryview(body))
                await to_crypto.send(body)

    def open_frame(body: bytearray) -> list[Any]:
        return channel.receive_frame(bytes(body))

    async def decrypt() -> None:
        received = 0
        closed = False
        async with from_wire:
            async for body in from_wire:
                for event in await trio.to_thread.run_sync(open_frame, body):
                    if isinstance(event, Data):
                        if received == 0 and event.payload != chunk:
                            raise ChannelError(
                                "tampered", "the first chunk did not decrypt to what was sent"
                            )
                        received += len(event.payload)
                    elif isinstance(event, Closed):
                        closed = True
        if received != frames * len(chunk) or not closed:
            raise ChannelError("truncated", f"received {received} bytes, closed={closed}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(decrypt)
