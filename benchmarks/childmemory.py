"""The code a benchmark puts at the top of a child Python process whose memory it measures.

VmHWM is the process's own peak RSS (ru_maxrss would include what the parent held when it forked), and
RUSAGE_CHILDREN covers the tools it waited for (llama-quantize). A thread samples RssAnon: the RSS of a
measurement is mostly clean pages of the memory-mapped model, which the kernel can drop, so the anonymous part is
what must fit. The child reads `_status(key)`, `_anon[0]` (the sampled peak, KiB) and `_start` (time.monotonic()
when the monitor started).
"""

import textwrap


def monitor(interval: float) -> str:
    """Child code sampling RssAnon every `interval` seconds."""
    return textwrap.dedent(f"""
        import json, re, resource, threading, time
        def _status(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        _anon = [0]
        def _watch():
            while True:
                _anon[0] = max(_anon[0], _status("RssAnon"))
                time.sleep({interval!r})
        threading.Thread(target=_watch, daemon=True).start()
        _start = time.monotonic()
    """)
