# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""A unix socket proxy that delays everything it forwards, each way, as a
network link with that latency would: a chunk read at time t is sent on at
t + delay, in order, while later chunks keep coming (latency, not a limit on
throughput). Reused buffers and a thread a direction keep its own CPU low.

    python bench/delay_proxy.py LISTEN_SOCKET UPSTREAM_SOCKET DELAY_MS

Prints "ready" once it listens; stops on SIGTERM.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time

CHUNK = 1024**2
# Chunks in flight a direction: more than a 2 ms link holds at full speed.
BUFFERS = 16


def forward(source, dest, delay):
    free = queue.Queue()
    for _slot in range(BUFFERS):
        free.put(memoryview(bytearray(CHUNK)))
    sent = queue.Queue()

    def send():
        while (item := sent.get()) is not None:
            due, buf, n = item
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                dest.sendall(buf[:n])
            except OSError:
                break
            free.put(buf)
        dest.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            buf = free.get()
            n = source.recv_into(buf)
            if n == 0:
                break
            sent.put((time.monotonic() + delay, buf, n))
    except OSError:
        pass
    sent.put(None)
    sender.join()


def serve(client, upstream, delay):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(upstream)
    except OSError:
        client.close()
        server.close()
        return
    back = threading.Thread(target=forward, args=(server, client, delay), daemon=True)
    back.start()
    forward(client, server, delay)
    back.join()
    client.close()
    server.close()


def main(listen, upstream, delay):
    if os.path.exists(listen):
        os.unlink(listen)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen)
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    while True:
        client, _address = listener.accept()
        threading.Thread(target=serve, args=(client, upstream, delay), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000)
