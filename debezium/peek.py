#!/usr/bin/env python3
"""Print what the runner (or Debezium Server) publishes, without disturbing the topology.

Binds a temporary exclusive, auto-delete queue to an EXISTING exchange (it never declares the
exchange) and prints one line per message: routing key, op, key columns and headers count.

    .venv/bin/python debezium/peek.py                      # exchange cdc.events, binding '#'
    .venv/bin/python debezium/peek.py --exchange cdc.events --binding 'dbserver1.public.#' --raw
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pika
from pika.exceptions import ChannelClosedByBroker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amqp-url", default=os.environ.get("DBZ_AMQP_URL") or os.environ.get("AMQP_URL")
                   or "amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--exchange", default=os.environ.get("DBZ_EXCHANGE", "cdc.events"))
    p.add_argument("--binding", default="#")
    p.add_argument("--raw", action="store_true", help="print full bodies and headers as JSON lines")
    p.add_argument("--count", type=int, default=0, help="exit after N messages")
    a = p.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    ch = conn.channel()
    try:
        ch.exchange_declare(a.exchange, passive=True)
    except ChannelClosedByBroker as e:
        print(f"exchange {a.exchange!r} not found ({e.reply_text}); start cdc-indexer first", file=sys.stderr)
        return 3
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(q, a.exchange, a.binding)
    print(f"listening on {a.exchange!r} binding {a.binding!r} (Ctrl-C to stop)", file=sys.stderr)
    seen = 0
    for method, props, body in ch.consume(q, auto_ack=True):
        seen += 1
        text = body.decode("utf-8", "replace")
        if a.raw:
            print(json.dumps({"routing_key": method.routing_key, "delivery_mode": props.delivery_mode,
                              "headers": props.headers, "body": text}), flush=True)
        elif text == "default":
            print(f"{method.routing_key}  TOMBSTONE (body 'default')", flush=True)
        else:
            try:
                payload = json.loads(text).get("payload", {})
                row = payload.get("after") or payload.get("before") or {}
                ident = {k: row[k] for k in list(row)[:2]}
                print(f"{method.routing_key}  op={payload.get('op')} "
                      f"snapshot={payload.get('source', {}).get('snapshot')} {ident}", flush=True)
            except (ValueError, AttributeError):
                print(f"{method.routing_key}  {text[:120]}", flush=True)
        if a.count and seen >= a.count:
            break
    conn.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
