#!/usr/bin/env python3
"""A labeling tool that talks to troupe over NATS, in about 200 lines.

It reads candidate sets from `troupe.<run>.candidates`, ranks each one, and
publishes the ranking in JSON on `troupe.<run>.rankings` with a
`Troupe-Reply-To` header, then prints the receipt that the ranking intake
sends back. Replace `rank()` with your own tool's logic or a person's input.

Requirements: Python 3.9+, `pip install nats-py`, and `pip install msgpack`
to read candidate sets that troupe's sampler publishes in MessagePack (the
default); JSON candidate sets need no extra package.

Two ways to read candidate sets:

  --mode jetstream  (default) a durable pull consumer on the run's stream
                    `TROUPE_<run>`: sets published before the client started
                    are delivered too, and each set is acknowledged only
                    after its receipt arrives, so none is lost.
  --mode core       a plain subscription: live sets only, nothing replayed.

Example:

  python3 examples/labeling_client.py --nats nats://127.0.0.1:4222 --run demo \\
      --labeler my-tool --max-sets 10
"""

import argparse
import asyncio
import json
import sys
import time
import uuid

try:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
except ImportError:
    sys.exit("labeling_client.py needs nats-py: pip install nats-py")

# The envelope schema version this client writes.
SCHEMA_VERSION = 1
REPLY_TO_HEADER = "Troupe-Reply-To"


def parse_args():
    parser = argparse.ArgumentParser(description="Rank troupe candidate sets over NATS.")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--run", default="default", help="troupe run id; subjects are troupe.<run>.<name>")
    parser.add_argument("--labeler", default="labeling-client", help="labeler id written into each ranking")
    parser.add_argument("--mode", choices=["jetstream", "core"], default="jetstream", help="how to read candidate sets")
    parser.add_argument("--durable", default=None, help="JetStream consumer name (default: labeling-client-<labeler>)")
    parser.add_argument("--max-sets", type=int, default=0, help="exit after ranking this many sets; 0 runs until Ctrl-C")
    parser.add_argument("--idle-timeout", type=float, default=0.0, help="exit after this many seconds without a set; 0 waits forever")
    parser.add_argument("--receipt-timeout", type=float, default=10.0, help="seconds to wait for each receipt")
    return parser.parse_args()


def decode(data, headers):
    """Decodes an envelope in the encoding its Content-Type header names."""
    content_type = (headers or {}).get("Content-Type", "application/msgpack").split(";")[0].strip().lower()
    if content_type == "application/json":
        return json.loads(data)
    try:
        import msgpack
    except ImportError:
        raise RuntimeError("this message is MessagePack; install msgpack (pip install msgpack) to read it")
    return msgpack.unpackb(data, raw=False)


def rank(candidate_set):
    """Returns the order: groups of candidate ids, best first; ids in one group are tied.

    This example prefers answers that stopped on their own (finish_reason
    "eos"), then shorter ones, and ties candidates that look the same.
    """
    def key(candidate):
        return (0 if candidate["finish_reason"] == "eos" else 1, candidate["token_count"])

    order = []
    last_key = None
    for candidate in sorted(candidate_set["candidates"], key=key):
        if order and key(candidate) == last_key:
            order[-1].append(candidate["candidate_id"])
        else:
            order.append([candidate["candidate_id"]])
        last_key = key(candidate)
    return order


def ranking_envelope(run, labeler, candidate_set, order):
    """Builds a ranking envelope. The ranking id is derived from the labeler and
    the set, so a resend after a crash is recognised as a duplicate."""
    ranking_id = f"{labeler}-{candidate_set['set_id']}"
    return {
        "schema": SCHEMA_VERSION,
        "kind": "ranking",
        "id": ranking_id,
        "run": run,
        "time_ms": int(time.time() * 1000),
        "payload": {
            "ranking_id": ranking_id,
            "set_id": candidate_set["set_id"],
            "labeler": labeler,
            "order": order,
            "note": None,
        },
    }


async def submit(nc, args, candidate_set):
    """Ranks one set, publishes the ranking and waits for its receipt."""
    order = rank(candidate_set)
    if len(order) < 2:
        print(f"set {candidate_set['set_id']}: every candidate ties, skipped", flush=True)
        return None
    envelope = ranking_envelope(args.run, args.labeler, candidate_set, order)
    inbox = nc.new_inbox()
    receipts = await nc.subscribe(inbox, max_msgs=1)
    headers = {
        "Content-Type": "application/json",
        "Nats-Msg-Id": envelope["id"],
        REPLY_TO_HEADER: inbox,
    }
    await nc.publish(f"troupe.{args.run}.rankings", json.dumps(envelope).encode(), headers=headers)
    try:
        message = await receipts.next_msg(timeout=args.receipt_timeout)
    except NatsTimeout:
        print(f"set {candidate_set['set_id']}: no receipt within {args.receipt_timeout} s", flush=True)
        return None
    receipt = decode(message.data, message.headers)["payload"]
    outcome = "accepted" if receipt["accepted"] else f"rejected: {receipt['reason']}"
    order_text = " > ".join(" = ".join(group) for group in order)
    print(
        f"set {receipt['set_id']}: {order_text}: {outcome}, pairs {receipt['pairs']}, duplicate {receipt['duplicate']}",
        flush=True,
    )
    return receipt


async def run_jetstream(nc, args):
    js = nc.jetstream()
    durable = args.durable or f"labeling-client-{args.labeler}"
    subscription = await js.pull_subscribe(
        f"troupe.{args.run}.candidates", durable=durable, stream=f"TROUPE_{args.run}"
    )
    ranked = 0
    idle_since = time.monotonic()
    while args.max_sets == 0 or ranked < args.max_sets:
        try:
            messages = await subscription.fetch(1, timeout=1.0)
        except NatsTimeout:
            if args.idle_timeout and time.monotonic() - idle_since > args.idle_timeout:
                print(f"no candidate set for {args.idle_timeout} s, stopping", flush=True)
                break
            continue
        for message in messages:
            idle_since = time.monotonic()
            try:
                candidate_set = decode(message.data, message.headers)["payload"]
            except Exception as error:  # a message this tool cannot read is left to others
                print(f"cannot read a candidate set: {error}", file=sys.stderr, flush=True)
                await message.term()
                continue
            receipt = await submit(nc, args, candidate_set)
            if receipt is None:
                await message.nak(delay=5)
                continue
            await message.ack()
            ranked += 1
    return ranked


async def run_core(nc, args):
    subscription = await nc.subscribe(f"troupe.{args.run}.candidates")
    ranked = 0
    while args.max_sets == 0 or ranked < args.max_sets:
        try:
            message = await subscription.next_msg(timeout=args.idle_timeout or None)
        except NatsTimeout:
            print(f"no candidate set for {args.idle_timeout} s, stopping", flush=True)
            break
        candidate_set = decode(message.data, message.headers)["payload"]
        if await submit(nc, args, candidate_set) is not None:
            ranked += 1
    return ranked


async def main():
    args = parse_args()
    nc = await nats.connect(args.nats, name=f"troupe-labeling-client-{args.labeler}")
    try:
        runner = run_jetstream if args.mode == "jetstream" else run_core
        ranked = await runner(nc, args)
    finally:
        await nc.drain()
    print(f"ranked {ranked} sets", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
