"""A minimal MQTT 3.1.1 broker (amqtt) for machines without mosquitto: the demo's fallback.

Not for production: no persistence, no authentication, loopback only. Use mosquitto
(docs/mosquitto.conf) for real fleets. Usage: python scripts/embedded_broker.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

from amqtt.broker import Broker


async def serve(port: int) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"embedded MQTT 3.1.1 broker on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
