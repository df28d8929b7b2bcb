#!/usr/bin/env python3
"""Allocations per request from callgrind output: calls into mimalloc's entry points
(what Rust's global allocator calls; `__rust_alloc` and its kin are inlined away
in an LTO build) divided by the requests.

    python3 bench/allocs.py callgrind.out REQUESTS [callgrind.out REQUESTS ...]
"""
import re, sys
def count(path, names=("mi_malloc", "mi_zalloc", "mi_realloc", "mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned")):
    ids = {}
    total = {n: 0 for n in names}
    cur = None
    for line in open(path, errors="replace"):
        if line.startswith("cfn="):
            m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.strip())
            if m:
                if m.group(2):
                    ids[m.group(1)] = m.group(2)
                cur = ids.get(m.group(1), "")
            else:
                cur = line[4:].strip()
        elif line.startswith("calls=") and cur is not None:
            n = int(line[6:].split()[0])
            for name in names:
                if cur.endswith("::" + name) or cur == name:
                    total[name] += n
            cur = None
        elif line.startswith("fn="):
            m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.strip())
            if m and m.group(2):
                ids[m.group(1)] = m.group(2)
    return total
for path, n in zip(sys.argv[1::2], sys.argv[2::2]):
    t = count(path)
    print(path, {k: round(v / int(n), 2) for k, v in t.items() if v})
