"""One end of a KV transfer over pdserve's UCX transport, driven by JSON lines on
stdin, for tests that put the two ends in different network namespaces
(`ip netns exec NS python -m tests.multihost.ucx_peer recv|send`).

Replies are stdout lines starting with MARK (UCX writes its own log lines there too):
{"ok": result} or {"error": "ExceptionName: message"}. The receiver's first reply
is its UCX address. Commands: receiver {"expect": id} -> ticket, {"wait": id,
"seconds": s}, {"check": seed}; sender {"send": ticket, "seed": n, "seconds": s}.
"""

from __future__ import annotations

import asyncio
import json
import sys

MARK = "@peer "
BLOCKS = 4


def reply(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def ticket_to_json(t) -> dict:
    return {
        "transfer_id": t.transfer_id,
        "secret": t.secret.hex(),
        "address": t.address.hex(),
        "num_blocks": t.num_blocks,
        "block_bytes": t.block_bytes,
    }


async def handle(end, pool, cmd: dict):
    from pdserve.common.transfer import TransferTicket

    if "expect" in cmd:
        return ticket_to_json(end.expect(cmd["expect"], [pool.block(i) for i in range(BLOCKS)]))
    if "wait" in cmd:
        await end.wait(cmd["wait"], cmd["seconds"])
        return end.status(cmd["wait"]).name
    if "check" in cmd:  # every block holds the sender's pattern
        return all(bool(pool.block(i).eq(cmd["check"] + i).all()) for i in range(BLOCKS))
    if "send" in cmd:
        t = cmd["send"]
        ticket = TransferTicket(
            t["transfer_id"], bytes.fromhex(t["secret"]), bytes.fromhex(t["address"]), t["num_blocks"], t["block_bytes"]
        )
        for i in range(BLOCKS):
            pool.block(i).fill_(cmd["seed"] + i)
        await end.send(ticket, 0, [pool.block(i) for i in range(BLOCKS)], timeout=cmd["seconds"])
        return None
    raise ValueError(f"unknown command {cmd}")


async def main(role: str) -> None:
    from pdserve.common.kv.pool import KVPool
    from pdserve.common.kv.spec import KVSpec
    from pdserve.common.transfer import UcxKVReceiver, UcxKVSender

    pool = KVPool(KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64), BLOCKS)
    end = UcxKVReceiver() if role == "recv" else UcxKVSender()
    reply({"ok": end.address.hex() if role == "recv" else None})
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            reply({"ok": await handle(end, pool, json.loads(line))})
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}"})
    await end.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
