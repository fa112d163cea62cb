"""A Python target for the CPython runtime's tests (run by the interpreter under test).

    python pyshop.py MODULE_DIR [--main stdin|sleep|busy] [--workers KIND:N,...] [--clib LIB]
    python pyshop.py MODULE_DIR --bare

Imports `shop.parsers` from MODULE_DIR and keeps every kind of reference to
its functions: the module attribute, a `from ... import` copy, a callback in a
dict, a bound method, a class method. Prints `ready PID`, then:

- `--main stdin` (default): answers each line `call TEXT` with one line, the
  JSON list of what each reference returns for TEXT (or `ERR Type: message`);
  `code` answers the id() of parse_header's code object; `hold S` answers
  `holding`, then calls a C loop holding the GIL for S seconds, then `released`;
  `bench N` answers the mean ns per call of parse_header("a:1") over N calls;
- `--main sleep` / `--main busy`: the main thread sleeps / runs a Python loop;
  SIGUSR1 makes it answer as for `call` with the text in MODULE_DIR/ask.

Workers: `busy` (a Python loop), `sleep` (time.sleep), `cloop` (ctypes calls a
C loop without the GIL), `gil` (the C loop holding the GIL: ctypes.PyDLL),
each calling the C loop for 0.2 s at a time, forever; `gil-once:S`, one call
holding the GIL for S seconds (a C extension that never lets go).
"""

import ctypes
import json
import os
import signal
import sys
import threading
import time

if "--bare" in sys.argv:  # an interpreter that never imports shop.parsers
    print(f"ready {os.getpid()}", flush=True)
    for _line in sys.stdin:
        print("bare", flush=True)
    sys.exit(0)

sys.path.insert(0, sys.argv[1])
from shop import parsers
from shop.parsers import parse_header as copied

CALLBACKS = {"header": parsers.parse_header}
PARSER = parsers.Parser()
BOUND = PARSER.feed


def answer(text):
    refs = [parsers.parse_header, copied, CALLBACKS["header"], BOUND, parsers.Parser.check]
    results = []
    for ref in refs:
        try:
            results.append(repr(ref(text)))
        except Exception as e:
            results.append(f"ERR {type(e).__name__}: {e}")
    return json.dumps(results)


def worker(kind, lib, seconds):
    if kind == "busy":
        n = 0
        while True:
            n += 1
    elif kind == "sleep":
        while True:
            time.sleep(100)
    elif kind in ("cloop", "gil"):
        while True:
            lib.spin(ctypes.c_double(0.2))
    elif kind == "gil-once":
        lib.spin(ctypes.c_double(seconds))


def main():
    args = sys.argv[2:]
    opts = dict(zip(args[::2], args[1::2], strict=False))
    clib = opts.get("--clib")
    for spec in filter(None, opts.get("--workers", "").split(",")):
        kind, _, count = spec.partition(":")
        seconds = float(count) if kind == "gil-once" else 0.0
        lib = None
        if kind in ("cloop", "gil-once", "gil"):
            lib = (ctypes.CDLL if kind == "cloop" else ctypes.PyDLL)(clib)
            lib.spin.argtypes = [ctypes.c_double]
        for _ in range(1 if kind == "gil-once" else int(count)):
            threading.Thread(target=worker, args=(kind, lib, seconds), daemon=True).start()
    main_kind = opts.get("--main", "stdin")
    if main_kind in ("sleep", "busy"):

        def on_signal(signum, frame):
            with open(os.path.join(sys.argv[1], "ask")) as f:
                print(answer(f.read()), flush=True)

        signal.signal(signal.SIGUSR1, on_signal)
        print(f"ready {os.getpid()}", flush=True)
        n = 0
        while True:
            if main_kind == "sleep":
                time.sleep(1000)
            else:
                n += 1
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        command, _, text = line.rstrip("\n").partition(" ")
        if command == "call":
            print(answer(text), flush=True)
        elif command == "code":
            print(id(parsers.parse_header.__code__), flush=True)
        elif command == "bench":  # ns per call of parse_header("a:1"), over `text` calls
            f, n = parsers.parse_header, int(text)
            start = time.perf_counter_ns()
            for _ in range(n):
                f("a:1")
            print((time.perf_counter_ns() - start) / n, flush=True)
        elif command == "hold":  # a C extension holding the GIL for `text` seconds
            print("holding", flush=True)
            lib = ctypes.PyDLL(clib)
            lib.spin.argtypes = [ctypes.c_double]
            lib.spin(float(text))
            print("released", flush=True)
        elif command == "quit":
            print("bye", flush=True)
            return
        else:
            print(f"unknown {command}", flush=True)


main()
