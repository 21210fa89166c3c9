# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""A unix socket proxy that delays everything it forwards, each way, as a
network link with that latency would: a chunk read at time t is sent on at
t + delay, in order, while later chunks keep coming (latency, not a limit on
throughput). The data waits in pipes, moved in and out with splice(2), not
through this process's memory: a link costs the hosts no CPU, and the proxy
should cost little. PIPES pipes of CHUNK bytes (the most any user may make a
pipe hold) a direction carry what is in flight.

    python bench/delay_proxy.py LISTEN_SOCKET UPSTREAM_SOCKET DELAY_MS

Prints "ready" once it listens; stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import signal
import socket
import sys
import threading
import time

CHUNK = 1024**2
# Chunks in flight a direction: more than a 2 ms link holds at full speed.
PIPES = 32


def forward(source, dest, delay):
    free = queue.Queue()
    pipes = []
    for _slot in range(PIPES):
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        pipes += [r, w]
        free.put((r, w))
    sent = queue.Queue()

    def send():
        while (item := sent.get()) is not None:
            due, chunk, n = item
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                while n:
                    n -= os.splice(chunk[0], dest.fileno(), n)
            except OSError:
                break
            free.put(chunk)
        with contextlib.suppress(OSError):
            dest.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            chunk = free.get()
            n = os.splice(source.fileno(), chunk[1], CHUNK)
            if n == 0:
                break
            sent.put((time.monotonic() + delay, chunk, n))
    except OSError:
        pass
    sent.put(None)
    sender.join()
    for fd in pipes:
        os.close(fd)


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
