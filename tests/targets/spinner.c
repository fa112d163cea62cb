/* spinner: threads whose instruction pointer is inside a site.
 *
 * Patched functions, hand-written in spinner_asm.S:
 *
 * int hot(int x) = 3x + 1, called in a tight loop by NTHREADS workers:
 *   +0x0  89 f8          mov  eax,edi
 *   +0x2  f3 90          pause
 *   +0x4  f3 90          pause
 *   +0x6  8d 44 40 01    lea  eax,[rax+rax*2+0x1]
 *   +0xa  c3             ret
 *   Site +0x0, 6 bytes (mov, pause, pause): the pauses are slow, so a
 *   stopped worker is usually at +0x2 or +0x4, inside the site.  Measured
 *   here (4 workers, 2 CPUs): 191 of 200 stops had a worker inside.  The
 *   engine must retry and, while the workers run, give up with a clear
 *   error; after "park" (workers asleep in FUTEX_WAIT, outside hot) it
 *   must succeed.
 *   Site +0x6, 5 bytes (lea, ret): rarely occupied past its first byte.
 *   The patch the counters expect (DELTA 3): "add edi, 1" at +0x0, or
 *   "add eax, 1" at +0x6; either makes hot return 3x + 4.
 *
 * long stuck_read(int fd, void *buf, size_t n), a raw read(2):
 *   +0x0  31 c0          xor  eax,eax
 *   +0x2  0f 05          syscall
 *   +0x4  c3             ret
 *   Site +0x0, 5 bytes, the whole function.  After "stick" a thread is
 *   blocked in it: stopped, its rip is +0x4 with rax = -512 (-ERESTARTSYS)
 *   and orig_rax = 0, and on resume the kernel restarts the read at +0x2.
 *   Both are inside the site, deterministically, until "unstick".
 *
 * Usage: spinner [NTHREADS=4 [DELTA=3]]
 * Commands (workers.h): stats, sync, park, unpark, tids, call N -> hot(N);
 *   stick    ->  starts the stuck thread, answers "stuck <tid>" once it is
 *                blocked in read
 *   unstick  ->  writes one byte to its pipe, joins it, "unstuck 1"
 *   quit     ->  unsticks, stops the workers, "bye"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "proto.h"
#include "workers.h"

int hot(int x);
long stuck_read(int fd, void *buf, unsigned long count);

static int unpatched(int x)
{
    return x * 3 + 1;
}

/* The stuck thread: blocked in stuck_read() until "unstick". */
static int stuck_pipe[2] = {-1, -1};
static pthread_t stuck_thread;
static volatile int stuck_tid;
static long stuck_result;

static void *stuck_main(void *arg)
{
    char c;
    (void)arg;
    stuck_tid = proto_gettid();
    stuck_result = stuck_read(stuck_pipe[0], &c, 1);
    return NULL;
}

static void stick(void)
{
    if (stuck_pipe[0] >= 0) {
        proto_reply("error already stuck");
        return;
    }
    stuck_tid = 0;
    if (pipe(stuck_pipe) || pthread_create(&stuck_thread, NULL, stuck_main, NULL)) {
        proto_reply("error stick failed");
        return;
    }
    while (!stuck_tid)
        usleep(100);
    if (proto_wait_blocked(stuck_tid, 0))
        proto_reply("stuck %d", stuck_tid);
    else
        proto_reply("error stuck thread %d not blocked in read", stuck_tid);
}

static void unstick(void)
{
    if (stuck_pipe[0] < 0) {
        proto_reply("error not stuck");
        return;
    }
    if (write(stuck_pipe[1], "x", 1) != 1) {
        proto_reply("error write failed");
        return;
    }
    pthread_join(stuck_thread, NULL);
    close(stuck_pipe[0]);
    close(stuck_pipe[1]);
    stuck_pipe[0] = stuck_pipe[1] = -1;
    proto_reply("unstuck %ld", stuck_result);
}

int main(int argc, char **argv)
{
    char line[PROTO_LINE_MAX];
    struct workers_config cfg = {
        .count = argc > 1 ? atol(argv[1]) : 4,
        .fn = hot,
        .expected = unpatched,
        .delta = argc > 2 ? atoi(argv[2]) : 3,
    };

    proto_init();
    if (cfg.count < 1 || cfg.delta == 0) {
        fprintf(stderr, "usage: spinner [NTHREADS [DELTA]]\n");
        return 2;
    }
    workers_start(&cfg);
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (workers_command(line))
            continue;
        if (proto_is(line, "stick"))
            stick();
        else if (proto_is(line, "unstick"))
            unstick();
        else if (proto_is(line, "quit")) {
            if (stuck_pipe[0] >= 0 && write(stuck_pipe[1], "x", 1) == 1)
                pthread_join(stuck_thread, NULL);
            workers_stop();
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    workers_stop();
    return 0;
}
