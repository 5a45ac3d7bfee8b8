"""A loopback TCP relay that emulates a WAN link (what `tc netem delay D rate R` does, in user space).

    python benchmarks/netem_proxy.py --listen 9001 --target 9000 --rtt-ms 20 --mbit 10

Each direction is its own link: a chunk leaves when the link has serialised everything before it
(`bytes * 8 / rate`), and arrives `rtt / 2` later. Binds 127.0.0.1 only. Prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import time


class Wire:
    """One direction: a FIFO with a bandwidth and a propagation delay."""

    def __init__(self, one_way_s: float, bytes_per_s: float) -> None:
        self.one_way_s = one_way_s
        self.bytes_per_s = bytes_per_s
        self.free_at = 0.0

    def arrival(self, num_bytes: int) -> float:
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + num_bytes / self.bytes_per_s
        return self.free_at + self.one_way_s


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: Wire) -> None:
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            at, data = item
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((wire.arrival(len(data)), data))
    except ConnectionError:
        pass
    queue.put_nowait(None)
    await task


async def main(args: argparse.Namespace) -> None:
    rate = args.mbit * 1e6 / 8

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", args.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_w, Wire(args.rtt_ms / 2000, rate)),
                             pump(up_r, writer, Wire(args.rtt_ms / 2000, rate)), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--mbit", type=float, default=10.0)
    asyncio.run(main(p.parse_args()))
