/* threads: many threads call the patched function while it is being patched.
 *
 * Patched function: int compute(int x) { return x * 2 + 1; }, in
 * compute_fn.c (its own translation unit; noinline, noclone, exported).
 * gcc 12.2 -O2, offsets from compute:
 *   +0x0  8d 44 3f 01   lea eax,[rdi+rdi*1+0x1]
 *   +0x4  c3            ret
 * Site: +0x0, 5 bytes, the whole function.  A worker stopped at +0x4 (the
 * ret) is inside the site: with 16 workers about 1 stop in 7 finds one
 * there, so the engine has to retry now and then (spinner makes it the rule).
 *
 * The patch the counters expect: a patchlet "add edi, 1" (it runs before the
 * displaced lea) makes compute return 2x + 3 = unpatched + 2, the default
 * DELTA.  A patchlet that returns by itself ("lea eax,[rdi+rdi*1+2]; ret")
 * gives unpatched + 1: start "threads N 1".
 *
 * Usage: threads [NTHREADS=16 [DELTA=2 [spin|idle]]]
 *   spin (default): workers call compute() in a tight loop on inputs in
 *        0..0xfffff (32 LCG steps between calls) and count each result as
 *        old (2x+1), new (2x+1+DELTA) or bad (anything else: a torn patch).
 *   idle: each worker makes one call, then sleeps in FUTEX_WAIT (for
 *        thousands of threads; "unpark" lets them spin).
 * "ready" comes once every worker has made its first call.
 *
 * Commands (workers.h): stats -> "calls <n> old <n> new <n> bad <n>", sync,
 * park, unpark, tids -> "tids <n>", call N -> compute(N) from the main
 * thread, quit -> stops and joins the workers, "bye".
 * A patch test: patch; sync; s1 = stats; sync; s2 = stats; then
 * s2.old == s1.old (no unpatched call after the patch), s2.new > s1.new,
 * bad == 0.  Removal: the same with old and new swapped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "workers.h"

int compute(int x);

static int unpatched(int x)
{
    return x * 2 + 1;
}

int main(int argc, char **argv)
{
    char line[PROTO_LINE_MAX];
    struct workers_config cfg = {
        .count = argc > 1 ? atol(argv[1]) : 16,
        .fn = compute,
        .expected = unpatched,
        .delta = argc > 2 ? atoi(argv[2]) : 2,
        .start_parked = argc > 3 && strcmp(argv[3], "idle") == 0,
        /* Time outside compute(): with 16 workers about 1 stop in 7 finds one
         * at compute+4 (inside the site); with 0 it is 4 stops in 5. */
        .work = 32,
    };

    proto_init();
    if (cfg.count < 1 || cfg.delta == 0 ||
        (argc > 3 && !cfg.start_parked && strcmp(argv[3], "spin") != 0)) {
        fprintf(stderr, "usage: threads [NTHREADS [DELTA [spin|idle]]]\n");
        return 2;
    }
    workers_start(&cfg);
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (workers_command(line))
            continue;
        if (proto_is(line, "quit")) {
            workers_stop();
            proto_reply("bye");
            return 0;
        }
        proto_unknown(line);
    }
    workers_stop();
    return 0;
}
