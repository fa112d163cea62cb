/* Worker threads for threads.c and spinner.c; see workers.h. */
#define _GNU_SOURCE
#include "workers.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

struct worker {
    pthread_t thread;
    unsigned seed;
    /* Single writer (the worker), read by the main thread: relaxed stores. */
    _Atomic unsigned long old_calls, new_calls, bad_calls;
    _Atomic int last_bad_x, last_bad_result;
} __attribute__((aligned(64)));

static struct workers_config cfg;
static struct worker *workers;
static _Atomic int stop;
static _Atomic long started;
/* Parked workers sleep in FUTEX_WAIT on park_requested.  A raw futex, not a
 * condition variable: waking thousands of threads through a mutex convoys
 * for tens of seconds when they compete with spinning workers for 2 CPUs. */
static _Atomic int park_requested;
static _Atomic long parked;

static void bump(_Atomic unsigned long *counter)
{
    atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static void park_here(void)
{
    atomic_fetch_add(&parked, 1);
    while (atomic_load(&park_requested) && !atomic_load(&stop))
        syscall(SYS_futex, &park_requested, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
    atomic_fetch_sub(&parked, 1);
}

static void *work(void *arg)
{
    struct worker *w = arg;
    unsigned x = w->seed;
    int first = 1;

    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        int v = (int)(x & 0xfffff);
        int r = cfg.fn(v);
        int expected = cfg.expected(v);
        if (r == expected)
            bump(&w->old_calls);
        else if (r == expected + cfg.delta)
            bump(&w->new_calls);
        else {
            atomic_store_explicit(&w->last_bad_x, v, memory_order_relaxed);
            atomic_store_explicit(&w->last_bad_result, r, memory_order_relaxed);
            bump(&w->bad_calls);
        }
        x = x * 1103515245u + 12345u;
        for (int k = 0; k < cfg.work; k++)
            x = x * 1103515245u + 12345u;
        if (first) {
            first = 0;
            atomic_fetch_add(&started, 1);
        }
        if (atomic_load_explicit(&park_requested, memory_order_relaxed))
            park_here();
    }
    return NULL;
}

static unsigned long total_calls(struct worker *w)
{
    return atomic_load_explicit(&w->old_calls, memory_order_relaxed) +
           atomic_load_explicit(&w->new_calls, memory_order_relaxed) +
           atomic_load_explicit(&w->bad_calls, memory_order_relaxed);
}

static void stats(void)
{
    unsigned long o = 0, n = 0, b = 0;
    int bx = 0, br = 0;
    for (long i = 0; i < cfg.count; i++) {
        o += atomic_load_explicit(&workers[i].old_calls, memory_order_relaxed);
        n += atomic_load_explicit(&workers[i].new_calls, memory_order_relaxed);
        unsigned long wb = atomic_load_explicit(&workers[i].bad_calls, memory_order_relaxed);
        if (wb) {
            bx = atomic_load_explicit(&workers[i].last_bad_x, memory_order_relaxed);
            br = atomic_load_explicit(&workers[i].last_bad_result, memory_order_relaxed);
        }
        b += wb;
    }
    if (b)
        proto_reply("calls %lu old %lu new %lu bad %lu last_bad f(%d)=%d", o + n + b, o, n, b,
                    bx, br);
    else
        proto_reply("calls %lu old %lu new %lu bad %lu", o + n + b, o, n, b);
}

/* Poll cond() every 0.1 ms for up to WAIT_SECONDS.  The target may wait;
 * tests never do, they read the answer line. */
#define WAIT_SECONDS 20

static int wait_until(int (*cond)(void *), void *arg)
{
    struct timespec ts = {0, 100000}, now, deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += WAIT_SECONDS;
    for (;;) {
        if (cond(arg))
            return 1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > deadline.tv_sec ||
            (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec))
            return cond(arg);
        nanosleep(&ts, NULL);
    }
}

static int all_advanced(void *arg)
{
    unsigned long *mark = arg;
    for (long i = 0; i < cfg.count; i++)
        if (total_calls(&workers[i]) < mark[i])
            return 0;
    return 1;
}

static void sync_workers(void)
{
    if (atomic_load(&park_requested)) {
        proto_reply("error sync: workers are parked");
        return;
    }
    unsigned long *mark = calloc((size_t)cfg.count, sizeof *mark);
    for (long i = 0; i < cfg.count; i++)
        mark[i] = total_calls(&workers[i]) + 2;
    proto_reply(wait_until(all_advanced, mark) ? "synced" : "sync timeout");
    free(mark);
}

static int all_parked(void *arg)
{
    (void)arg;
    return atomic_load(&parked) == cfg.count;
}

static int park(void)
{
    atomic_store(&park_requested, 1);
    return wait_until(all_parked, NULL);
}

static void unpark(void)
{
    atomic_store(&park_requested, 0);
    syscall(SYS_futex, &park_requested, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static int all_started(void *arg)
{
    (void)arg;
    return atomic_load(&started) == cfg.count;
}

void workers_start(const struct workers_config *config)
{
    pthread_attr_t attr;

    cfg = *config;
    workers = calloc((size_t)cfg.count, sizeof *workers);
    if (!workers) {
        perror("calloc");
        exit(1);
    }
    /* Parking before the first call makes every worker park right after it. */
    atomic_store(&park_requested, cfg.start_parked);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024); /* thousands of threads stay cheap */
    for (long i = 0; i < cfg.count; i++) {
        workers[i].seed = (unsigned)(i * 7919 + 1);
        if (pthread_create(&workers[i].thread, &attr, work, &workers[i])) {
            perror("pthread_create");
            exit(1);
        }
    }
    pthread_attr_destroy(&attr);
    if (!wait_until(all_started, NULL) || (cfg.start_parked && !park())) {
        fprintf(stderr, "workers did not start within %d s\n", WAIT_SECONDS);
        exit(1);
    }
}

int workers_command(const char *line)
{
    long n;

    if (proto_is(line, "stats"))
        stats();
    else if (proto_is(line, "sync"))
        sync_workers();
    else if (proto_is(line, "park")) {
        if (park())
            proto_reply("parked %ld", cfg.count);
        else
            proto_reply("park timeout");
    } else if (proto_is(line, "unpark")) {
        unpark();
        proto_reply("unparked");
    } else if (proto_is(line, "tids"))
        proto_reply("tids %d", proto_thread_count());
    else if (proto_arg_int(line, "call", &n))
        proto_reply("%d", cfg.fn((int)n));
    else
        return 0;
    return 1;
}

void workers_stop(void)
{
    atomic_store(&stop, 1);
    unpark();
    for (long i = 0; i < cfg.count; i++)
        pthread_join(workers[i].thread, NULL);
}
