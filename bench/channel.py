"""``dwcp bench channel --json``: bulk throughput of one secure channel vs raw trio TCP.

Both runs move the same bytes over a real loopback TCP connection, both ends in
this process:

* ``raw_tcp``: the sender writes frame-sized buffers with ``send_all``; the receiver
  reads with ``recv_into`` into a reused buffer;
* ``channel``: a :class:`mesh.channel.SecureChannel` pair after a real handshake
  over the same socket type; every chunk becomes one length-prefixed secretstream
  frame (:func:`mesh.channel.frame` layout). Each side runs one long-lived crypto
  thread (libsodium's calls release the GIL) pipelined with the trio task doing
  its socket I/O, so on two cores the two crypto stages run in parallel with each
  other and with the kernel's copying. Nothing is allocated per frame: the sender
  encrypts with :meth:`~mesh.channel.SecureChannel.send_into` into a small ring of
  buffers that leave room for the length prefix (one ``send_all`` per frame); the
  receiver reads with ``recv_into`` into another ring and decrypts with
  :meth:`~mesh.channel.SecureChannel.receive_frame_into` into one reused buffer.
  Buffers go back and forth through ``queue.SimpleQueue`` (to the thread) and
  ``TrioToken.run_sync_soon`` (to trio): one thread start per run, not two thread
  hops per frame (``trio.to_thread`` per frame cost about 70 us of CPU each).

* ``amst_link``: the product's own send path, what an AMST stream runs
  (:class:`mesh.runtime.amst_stream.Link`, issue 17 item 6): each chunk becomes an
  ``amst.sealed`` message (both ends offer sealed chunks, as two DCs of this version
  do: no SHA-256, the channel's AEAD authenticates it), is sealed into the link's
  reused buffers and written by :meth:`~mesh.runtime.amst_stream.Link.send_chunk` in a
  worker; the receiver's :meth:`~mesh.runtime.amst_stream.Link.receive_bulk` reads,
  decrypts and decodes it, in a worker. ``--amst-digest`` adds ``amst_link_sha256_*``:
  the same with the SHA-256 per chunk (``amst.chunk``) that a peer without sealed
  chunks gets, hashed at each end. At AMST's chunk size
  (``mesh.amst.policy.CHUNK_MAX``, 1 MiB) unless ``--amst-chunk-kib`` says otherwise,
  whatever ``--frame-kib`` is: this is the figure that says what AMST's streams can do.

The receiver checks that the first chunk decrypts to what was sent and that the
stream ends with the sender's final frame (``amst_link``: every chunk's id and kind, and
with ``--amst-digest`` its digest), so the
figure is for authenticated, correctly decrypted data.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mesh import identity, versions
from mesh.amst.policy import CHUNK_MAX
from mesh.amst.receiver import Chunk, SealedChunk
from mesh.channel import (
    FRAME_OVERHEAD,
    ChannelError,
    Closed,
    FrameReader,
    SecureChannel,
    frame,
)
from mesh.runtime.amst_stream import Link

__all__ = ["register", "measure"]

#: 4 MiB frames, the bulk chunk MAX_PLAINTEXT is sized for. Measured on the 2-core
#: loopback this bench targets (1 GiB runs): a frame still costs about 0.35 ms of CPU
#: beyond its bytes (thread wake-ups, a length prefix, socket waits), so 1 MiB frames
#: took 2.3 CPU s and gave 740-790 MB/s, 4 MiB frames 2.05 CPU s and 890-1060 MB/s.
#: ``--frame-kib 1024`` measures AMST's 1 MiB chunks.
DEFAULT_FRAME = 4 * 1024 * 1024
#: Reused frame buffers per side, i.e. frames in flight between the crypto thread and
#: the socket task: one being transformed, one on the wire, two queued so neither
#: stage waits on the other's jitter, without holding much memory.
RING = 4
_HOST = "127.0.0.1"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("channel", help="secure channel vs raw TCP bulk throughput on loopback")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument(
        "--size-mib", type=int, default=1024, help="bytes to move per run, MiB (default 1024)"
    )
    p.add_argument("--frame-kib", type=int, default=DEFAULT_FRAME // 1024, help="frame size, KiB")
    p.add_argument("--amst-chunk-kib", type=int, default=CHUNK_MAX // 1024,
                   help="chunk size of the amst_link run (AMST's send path), KiB (default "
                        f"{CHUNK_MAX // 1024}: AMST's chunk size)")  # fmt: skip
    p.add_argument("--amst-digest", action="store_true",
                   help="also run amst_link with a SHA-256 per chunk (amst.chunk, for a peer "
                        "without sealed chunks): amst_link_sha256_*")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.size_mib < 1 or not 1 <= args.frame_kib <= 4096
            or not 1 <= args.amst_chunk_kib <= 3072):  # fmt: skip
        print("dwcp bench channel: --size-mib must be >= 1, --frame-kib in 1..4096 and "
              "--amst-chunk-kib in 1..3072")  # fmt: skip
        return 2
    result = measure(args.size_mib * 1024 * 1024, args.frame_kib * 1024,
                     args.amst_chunk_kib * 1024, args.amst_digest)  # fmt: skip
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def measure(size: int, frame_size: int = DEFAULT_FRAME,
            amst_chunk: int = CHUNK_MAX, amst_digest: bool = False) -> dict[str, Any]:  # fmt: skip
    chunk = os.urandom(frame_size)
    frames = max(1, size // frame_size)
    total = frames * frame_size
    cpu0 = time.process_time()
    raw_s = trio.run(_timed_pair, _raw_send, _raw_receive, chunk, frames)
    cpu1 = time.process_time()
    channel_s = trio.run(_timed_pair, _channel_send, _channel_receive, chunk, frames)
    cpu2 = time.process_time()
    payload = os.urandom(amst_chunk)
    link_chunks = max(1, size // amst_chunk)
    link_s = trio.run(_timed_links, payload, link_chunks)
    cpu3 = time.process_time()
    link_mb = link_chunks * amst_chunk / 1e6
    mb = total / 1e6
    digest: dict[str, Any] = {}
    if amst_digest:
        digest_s = trio.run(_timed_links, payload, link_chunks, False)
        cpu4 = time.process_time()
        digest = {"amst_link_sha256_MBps": round(link_mb / digest_s, 1),
                  "amst_link_sha256_seconds": round(digest_s, 6),
                  "amst_link_sha256_cpu_seconds": round(cpu4 - cpu3, 3)}  # fmt: skip
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
        "amst_link_MBps": round(link_mb / link_s, 1),
        "amst_link_chunk_bytes": amst_chunk,
        "amst_link_chunks": link_chunks,
        "amst_link_seconds": round(link_s, 6),
        "amst_link_cpu_seconds": round(cpu3 - cpu2, 3),
        "amst_link_path": "mesh.runtime.amst_stream.Link: CBOR amst.sealed (no SHA-256), "
                          "secretstream into reused buffers, send in a worker; receive_bulk "
                          "(recv_into, decrypt into a reused buffer, one payload copy) in a "
                          "worker",
        **digest,
        "cipher": "XChaCha20-Poly1305 secretstream (libsodium via PyNaCl)",
        "cpus": os.cpu_count(),
    }


Sender = Callable[[trio.SocketStream, bytes, int, dict[str, Any]], Awaitable[None]]
Receiver = Callable[[trio.SocketStream, bytes, int, dict[str, Any]], Awaitable[None]]


async def _loopback_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected TCP pair on loopback (client end, server end)."""
    listeners = await trio.open_tcp_listeners(0, host=_HOST)
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream(_HOST, port)
    server = await listener.accept()
    await listener.aclose()
    return client, server


async def _timed_pair(send: Sender, receive: Receiver, chunk: bytes, frames: int) -> float:
    """Connect a loopback pair, run ``send`` and ``receive`` concurrently; seconds taken."""
    client, server = await _loopback_pair()
    # Buffers are allocated (and their pages faulted in) before the clock starts, as a
    # long-lived connection allocates them once: the raw receiver's one buffer, the
    # channel's two rings and plaintext buffer.
    shared: dict[str, Any] = {"buffer": memoryview(bytearray(len(chunk)))}
    if send is _channel_send:
        await _handshake(client, server, shared)
        shared["send_ring"] = [bytearray(4 + len(chunk) + FRAME_OVERHEAD) for _ in range(RING)]
        shared["recv_ring"] = [bytearray(len(chunk) + FRAME_OVERHEAD) for _ in range(RING)]
        shared["plaintext"] = bytearray(len(chunk))
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
    stream: trio.SocketStream, chunk: bytes, frames: int, shared: dict[str, Any]
) -> None:
    for _i in range(frames):
        await _recv_exactly(stream.socket, shared["buffer"])


# --------------------------------------------------------------------------- secure channel


async def _handshake(
    client: trio.SocketStream, server: trio.SocketStream, shared: dict[str, Any],
    offer: tuple[int, ...] = (1, 3),
) -> None:
    a_id, b_id = identity.generate(), identity.generate()
    peers = {"bench-a": a_id.public, "bench-b": b_id.public}
    a = SecureChannel(
        identity=a_id,
        name="bench-a",
        federation="bench",
        peers=peers,
        versions=offer,
        initiator=True,
        peer="bench-b",
    )
    b = SecureChannel(
        identity=b_id,
        name="bench-b",
        federation="bench",
        peers=peers,
        versions=offer,
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


def _deliver(channel: trio.MemorySendChannel[Any]) -> Callable[[Any], None]:
    """A callback for ``TrioToken.run_sync_soon`` that hands an item to a trio task; the
    channel's capacity covers every buffer of the ring, so it never blocks. Once the
    task has gone (it failed, the run is being torn down) the item is dropped."""

    def deliver(item: Any) -> None:
        try:
            channel.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    return deliver


async def _channel_send(
    stream: trio.SocketStream, chunk: bytes, frames: int, shared: dict[str, Any]
) -> None:
    channel: SecureChannel = shared["sender"]
    ring: list[bytearray] = shared["send_ring"]
    # Each buffer holds one whole wire frame: the 4-byte length prefix, then the
    # ciphertext that send_into writes after it, so a frame goes out in one send.
    free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
    for buf in ring:
        free.put(buf)
    to_wire, from_crypto = trio.open_memory_channel[tuple[bytearray, int]](len(ring) + 1)
    token = trio.lowlevel.current_trio_token()
    deliver = _deliver(to_wire)

    def encrypt_all() -> None:
        """One long-lived crypto thread: a frame costs no thread start or wake-up while
        free buffers are waiting, and the writer's ``put`` wakes it when none are."""
        for _i in range(frames):
            buf = free.get()
            if buf is None:  # the writer gave up
                return
            n = channel.send_into(chunk, memoryview(buf)[4:])
            buf[:4] = n.to_bytes(4, "big")
            token.run_sync_soon(deliver, (buf, 4 + n))

    async def encrypt() -> None:
        async with to_wire:
            await trio.to_thread.run_sync(encrypt_all)
            final = bytearray(frame(channel.close()))
            await to_wire.send((final, len(final)))

    async def write() -> None:
        try:
            async with from_crypto:
                async for buf, n in from_crypto:
                    await stream.send_all(memoryview(buf)[:n])
                    free.put(buf)
        finally:
            free.put(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(encrypt)
        nursery.start_soon(write)


async def _channel_receive(
    stream: trio.SocketStream, chunk: bytes, frames: int, shared: dict[str, Any]
) -> None:
    channel: SecureChannel = shared["receiver"]
    ring: list[bytearray] = shared["recv_ring"]
    capacity = len(chunk) + FRAME_OVERHEAD
    give_back, take = trio.open_memory_channel[bytearray](len(ring))
    for buf in ring:
        give_back.send_nowait(buf)
    work: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    plaintext: bytearray = shared["plaintext"]  # reused: only the crypto thread touches it
    token = trio.lowlevel.current_trio_token()
    deliver = _deliver(give_back)
    sock = stream.socket

    async def read() -> None:
        header = memoryview(bytearray(4))
        try:
            for _i in range(frames + 1):  # the data frames and the final frame
                await _recv_exactly(sock, header)
                n = int.from_bytes(header, "big")
                if n > capacity:
                    raise ChannelError("oversized", f"frame of {n} bytes exceeds {capacity}")
                buf = await take.receive()
                await _recv_exactly(sock, memoryview(buf)[:n])
                work.put((buf, n))
        finally:
            work.put(None)  # after the last frame, or when reading failed

    def decrypt_all() -> tuple[int, bool]:
        """One long-lived crypto thread, as on the sending side."""
        received = 0
        while (item := work.get()) is not None:
            buf, n = item
            got = channel.receive_frame_into(memoryview(buf)[:n], plaintext)
            token.run_sync_soon(deliver, buf)
            if isinstance(got, Closed):
                return received, True
            if received == 0 and memoryview(plaintext)[:got] != chunk:
                raise ChannelError("tampered", "the first chunk did not decrypt to what was sent")
            received += got
        return received, False

    async def decrypt() -> None:
        received, closed = await trio.to_thread.run_sync(decrypt_all)
        if received != frames * len(chunk) or not closed:
            raise ChannelError("truncated", f"received {received} bytes, closed={closed}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(decrypt)


# --------------------------------------------------------------------------- AMST's send path


async def _timed_links(payload: bytes, chunks: int, sealed: bool = True) -> float:
    """``chunks`` chunks of ``payload`` from one :class:`Link` to another over loopback,
    each as AMST's stream carries it; seconds from the first chunk to the last checked.
    ``sealed``: both ends offer sealed chunks (no SHA-256, as two DCs of this version do);
    else each chunk carries its SHA-256, as for a peer that does not read them."""
    client, server = await _loopback_pair()
    shared: dict[str, Any] = {}
    offer = (1, 3, versions.AMST_SEALED) if sealed else (1, 3)
    await _handshake(client, server, shared, offer)
    sender, receiver = Link(client, shared["sender"]), Link(server, shared["receiver"])
    if sender.sealed_chunks != sealed or receiver.sealed_chunks != sealed:
        raise ChannelError("malformed", "the links did not agree on the chunk format")
    kind = SealedChunk if sealed else Chunk

    async def write() -> None:
        for i in range(chunks):
            await sender.send_chunk(i, payload)
        await sender.send_final()

    async def read() -> None:
        for i in range(chunks):
            got = await receiver.receive_bulk()
            if got is None:
                raise ChannelError("truncated", f"stream ended after {i} of {chunks} chunks")
            msg, valid = got
            if (not valid or type(msg) is not kind or msg.chunk != i
                    or (i == 0 and msg.payload != payload)):  # fmt: skip
                raise ChannelError("tampered", f"chunk {i} did not arrive as sent")
        if await receiver.receive_bulk() != (None, False):
            raise ChannelError("truncated", "no final frame after the last chunk")

    try:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            nursery.start_soon(read)
        return time.perf_counter() - start
    finally:
        await sender.aclose()
        await receiver.aclose()
