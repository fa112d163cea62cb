/* bench_target: the process every benchmark patches.
 *
 *   bench_target SPIN BLOCKED BURN MAINSPIN
 *
 * SPIN extra threads, and the main thread too if MAINSPIN is 1, call
 * compute() in a loop and classify each result: unpatched (2x+1), patched
 * (2x+2) or bad (anything else).  Between two calls a spinning thread runs
 * burn(BURN), a dependent chain of multiplications outside the patched code,
 * so BURN sets how hot compute() is: 0 calls it back to back.  BLOCKED extra
 * threads sit in read() on a pipe nobody writes.  The process has
 * 1 + SPIN + BLOCKED threads.
 *
 * Line protocol on stdin/stdout: "ready <pid>" once every spinning thread has
 * made its first call, then one answer line per command:
 *   ns N     -> "ns <ns per call> calls N": the main thread times N calls of
 *               compute() in a loop (the loop's own cost included)
 *   stats    -> "calls <n> old <n> new <n> bad <n> last_bad <x> <result>"
 *   call X   -> "result <compute(X)>"
 *   tids     -> "tids <threads in /proc/self/task>"
 *   quit     -> "bye", exit 0 (EOF on stdin too)
 * The main thread reads stdin with raw read(); when it spins it polls stdin
 * (zero timeout) every 4096 calls.  No stdio, no malloc after start.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* The patched function: `lea eax,[rdi+rdi+1]; ret`, a 5-byte site. */
__attribute__((noinline, noipa, used)) int compute(int x)
{
    return x * 2 + 1;
}

/* What a patched compute() returns; gdb and Frida redirect compute() here. */
__attribute__((noinline, noipa, used)) int compute_alt(int x)
{
    return x * 2 + 2;
}

/* Never called: a second patch here keeps a cave mapped between cycles. */
__attribute__((noinline, noipa, used)) int spare(int x)
{
    return x * 3 + 7;
}

__attribute__((noinline, noipa)) unsigned burn(unsigned x, long n)
{
    for (long i = 0; i < n; i++)
        x = x * 1103515245u + 12345u;
    return x;
}

#define MAX_THREADS 4096

struct counters {
    _Atomic unsigned long old_calls, new_calls, bad_calls;
    _Atomic int last_bad_x, last_bad_result;
} __attribute__((aligned(64)));

static struct counters counters[MAX_THREADS];
static long burn_iterations;
static int block_pipe[2];
static volatile unsigned sink;

static void bump(_Atomic unsigned long *c)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* `count` calls of compute(), each result checked; returns the new seed. */
static unsigned spin_calls(struct counters *c, unsigned x, long count)
{
    for (long i = 0; i < count; i++) {
        int v = (int)(x & 0xfffff);
        int r = compute(v);
        if (r == 2 * v + 1)
            bump(&c->old_calls);
        else if (r == 2 * v + 2)
            bump(&c->new_calls);
        else {
            atomic_store_explicit(&c->last_bad_x, v, memory_order_relaxed);
            atomic_store_explicit(&c->last_bad_result, r, memory_order_relaxed);
            bump(&c->bad_calls);
        }
        x = x * 1103515245u + 12345u;
        if (burn_iterations)
            x = burn(x, burn_iterations);
    }
    return x;
}

static _Atomic long started;

static void *spinner(void *arg)
{
    struct counters *c = arg;
    unsigned x = (unsigned)(c - counters) * 7919u + 1u;
    x = spin_calls(c, x, 1);
    atomic_fetch_add(&started, 1);
    for (;;)
        x = spin_calls(c, x, 1 << 20);
    return NULL;
}

static void *blocker(void *arg)
{
    char b;
    (void)arg;
    for (;;)
        if (read(block_pipe[0], &b, 1) == 0)
            pause();
    return NULL;
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    char out[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, sizeof out - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || n > (int)sizeof out - 2)
        n = (int)sizeof out - 2;
    out[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, out + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            _exit(1);
        off += (int)w;
    }
}

static char inbuf[4096];
static size_t inlen;

/* Move one complete line out of inbuf into line; 1 if there was one. */
static int take_line(char *line, size_t size)
{
    char *nl = memchr(inbuf, '\n', inlen);
    if (!nl)
        return 0;
    size_t n = (size_t)(nl - inbuf);
    size_t copy = n < size - 1 ? n : size - 1;
    memcpy(line, inbuf, copy);
    line[copy] = '\0';
    memmove(inbuf, nl + 1, inlen - n - 1);
    inlen -= n + 1;
    return 1;
}

/* Read more of stdin; 0 on EOF or error. */
static int fill(void)
{
    if (inlen == sizeof inbuf)
        inlen = 0; /* an absurdly long line: drop it */
    ssize_t r;
    do /* a tracer (ptrace, Frida's injector) may interrupt the read */
        r = read(0, inbuf + inlen, sizeof inbuf - inlen);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        return 0;
    inlen += (size_t)r;
    return 1;
}

static double ns_per_call(long n)
{
    struct timespec a, b;
    unsigned acc = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        acc += (unsigned)compute((int)i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    sink = acc;
    return ((double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec)) / (double)n;
}

static int thread_count(void)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    int n = 0;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static long nthreads;

static void stats(void)
{
    unsigned long o = 0, nw = 0, b = 0;
    int bx = 0, br = 0;
    for (long i = 0; i < nthreads; i++) {
        o += atomic_load_explicit(&counters[i].old_calls, memory_order_relaxed);
        nw += atomic_load_explicit(&counters[i].new_calls, memory_order_relaxed);
        unsigned long wb = atomic_load_explicit(&counters[i].bad_calls, memory_order_relaxed);
        if (wb) {
            bx = atomic_load_explicit(&counters[i].last_bad_x, memory_order_relaxed);
            br = atomic_load_explicit(&counters[i].last_bad_result, memory_order_relaxed);
        }
        b += wb;
    }
    reply("calls %lu old %lu new %lu bad %lu last_bad %d %d", o + nw + b, o, nw, b, bx, br);
}

/* One command; 0 after "quit". */
static int command(const char *line)
{
    long v;
    if (sscanf(line, "ns %ld", &v) == 1 && v > 0)
        reply("ns %.6f calls %ld", ns_per_call(v), v);
    else if (sscanf(line, "call %ld", &v) == 1)
        reply("result %d", compute((int)v));
    else if (strcmp(line, "stats") == 0)
        stats();
    else if (strcmp(line, "tids") == 0)
        reply("tids %d", thread_count());
    else if (strcmp(line, "quit") == 0) {
        reply("bye");
        return 0;
    } else
        reply("error unknown command: %.200s", line);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: bench_target SPIN BLOCKED BURN MAINSPIN\n");
        return 2;
    }
    long spin = atol(argv[1]), blocked = atol(argv[2]);
    int mainspin = atoi(argv[4]);
    burn_iterations = atol(argv[3]);
    nthreads = 1 + spin;
    if (spin < 0 || blocked < 0 || burn_iterations < 0 || nthreads > MAX_THREADS) {
        fprintf(stderr, "bench_target: bad arguments\n");
        return 2;
    }
#ifdef PR_SET_PTRACER
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
#endif
    if (pipe(block_pipe)) {
        perror("pipe");
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0; i < spin + blocked; i++) {
        pthread_t t;
        void *(*fn)(void *) = i < spin ? spinner : blocker;
        if (pthread_create(&t, &attr, fn, &counters[1 + i])) {
            perror("pthread_create");
            return 1;
        }
    }
    pthread_attr_destroy(&attr);
    while (atomic_load(&started) < spin)
        usleep(100);

    char line[512];
    unsigned x = 1;
    reply("ready %d", (int)getpid());
    for (;;) {
        while (take_line(line, sizeof line))
            if (!command(line))
                return 0;
        if (mainspin) {
            struct pollfd p = {.fd = 0, .events = POLLIN};
            x = spin_calls(&counters[0], x, 4096);
            if (poll(&p, 1, 0) <= 0)
                continue;
        }
        if (!fill())
            return 0;
    }
}
