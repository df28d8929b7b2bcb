#!/usr/bin/env python3
"""Can this kernel relay an established tunnel itself? (issue 26, the next step)

Builds, with raw bpf(2) calls and nothing else, what a kernel-forwarded tunnel
needs: a SOCKHASH map, an sk_skb stream-verdict program that looks up the socket
the bytes arrived on (its own four-tuple as the key) and redirects them to the
socket stored under that key (its tunnel's other side), attached to the map. Then
it makes a tunnel on loopback (client -> front socket, back socket -> server),
puts both middle sockets in the map, and checks that bytes cross both ways with no
read or write from this process, then that a burst arrives whole and in order.

Run as root (or with CAP_BPF and CAP_NET_ADMIN): `python3 bench/sockmap_probe.py`.
It prints each step and exits non-zero at the first that fails.

The key, as the program builds it from `struct __sk_buff` (16 bytes): remote IPv4
and local IPv4 (network order), remote port (network order, in the upper half of a
32-bit word), local port (host order, a 32-bit word).
"""

import ctypes
import os
import socket
import struct
import sys

NR_BPF = 321  # x86_64
MAP_CREATE, MAP_UPDATE_ELEM, PROG_LOAD, PROG_ATTACH = 0, 2, 5, 8
MAP_TYPE_SOCKHASH = 18
PROG_TYPE_SK_SKB = 14
SK_SKB_STREAM_VERDICT = 5
HELPER_SK_REDIRECT_HASH = 72
# Offsets in struct __sk_buff.
REMOTE_IP4, LOCAL_IP4, REMOTE_PORT, LOCAL_PORT = 92, 96, 132, 136

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(NR_BPF, cmd, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd


def insn(op, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


def verdict_program(map_fd):
    """r6 = skb; key on the stack at r10-16; return bpf_sk_redirect_hash(skb, map, &key, 0)."""
    key = []
    for field, slot in ((REMOTE_IP4, -16), (LOCAL_IP4, -12), (REMOTE_PORT, -8), (LOCAL_PORT, -4)):
        key += [insn(0x61, 2, 6, field), insn(0x63, 10, 2, slot)]  # ldxw r2; stxw
    return b"".join(
        [insn(0xBF, 6, 1)]  # r6 = r1
        + key
        + [
            insn(0xBF, 1, 6),  # r1 = skb
            insn(0x18, 2, 1, 0, map_fd),  # r2 = map (64-bit immediate, two slots)
            insn(0),
            insn(0xBF, 3, 10),  # r3 = r10 - 16
            insn(0x07, 3, 0, 0, -16),
            insn(0xB7, 4, 0, 0, 0),  # r4 = 0: to the other socket's egress
            insn(0x85, 0, 0, 0, HELPER_SK_REDIRECT_HASH),
            insn(0x95),  # exit
        ]
    )


def key_of(s):
    lip, lport = s.getsockname()
    rip, rport = s.getpeername()
    return (
        socket.inet_aton(rip)
        + socket.inet_aton(lip)
        + b"\0\0"
        + struct.pack(">H", rport)
        + struct.pack("<I", lport)
    )


def step(name, f):
    try:
        out = f()
    except OSError as e:
        print(f"{name}: failed: {e}")
        sys.exit(1)
    print(f"{name}: ok")
    return out


def main():
    map_fd = step(
        "sockhash map", lambda: bpf(MAP_CREATE, struct.pack("IIII", MAP_TYPE_SOCKHASH, 16, 4, 64))
    )
    code = ctypes.create_string_buffer(verdict_program(map_fd))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack(
        "IIQQIIQII16sII",
        PROG_TYPE_SK_SKB,
        len(code.raw) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license),
        1,
        len(log),
        ctypes.addressof(log),
        0,
        0,
        b"corral_relay",
        0,
        SK_SKB_STREAM_VERDICT,
    )
    prog_fd = step("verdict program loaded", lambda: bpf(PROG_LOAD, attr))
    step(
        "program attached to the map",
        lambda: bpf(PROG_ATTACH, struct.pack("IIII", map_fd, prog_fd, SK_SKB_STREAM_VERDICT, 0)),
    )

    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname())
    near, _ = front.accept()
    far = socket.create_connection(back.getsockname())
    server, _ = back.accept()

    def put(key, sock):
        k = ctypes.create_string_buffer(key, 16)
        v = ctypes.create_string_buffer(struct.pack("I", sock.fileno()))
        attr = struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        return bpf(MAP_UPDATE_ELEM, attr)

    step("client side in the map", lambda: put(key_of(near), far))
    step("worker side in the map", lambda: put(key_of(far), near))
    for s in (client, server):
        s.settimeout(5)
    client.sendall(b"to the worker")
    assert server.recv(100) == b"to the worker", "client to worker"
    server.sendall(b"to the client")
    assert client.recv(100) == b"to the client", "worker to client"
    print("both ways, no read or write here: ok")
    frames = [bytes([i % 251]) * (50 + i % 450) for i in range(20000)]
    for f in frames:
        server.sendall(f)
    want = b"".join(frames)
    got = bytearray()
    while len(got) < len(want):
        got += client.recv(1 << 16)
    assert bytes(got) == want, "the burst arrived changed"
    print(f"a burst of {len(frames)} frames ({len(want)} bytes), whole and in order: ok")


if __name__ == "__main__":
    main()
