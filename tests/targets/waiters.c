/* waiters: one thread parked in each kind of blocking system call, counting how
 * each call returns: what a stop of the process does to blocked threads.
 *
 * Patched function: copy_packet, the same vuln_fn.c as vuln (see vuln.c for
 * its instructions, sites and fix; PIE offsets apply).
 *
 * Each waiter thread calls its system call in a loop, with raw syscall(2)
 * (so the number is exact) or, for "cond", pthread_cond_wait.  Nothing wakes
 * a waiter unless a test does: timeouts are an hour, and "_inf" kinds have
 * none.  Each return is counted as EINTR, ok (a result >= 0: woken), or
 * other (any other error).  Waiters for SysV IPC run in a private IPC
 * namespace (unshare(CLONE_NEWIPC), root only; skipped otherwise), so that no
 * semaphore or queue outlives the target.
 *
 * SIGUSR1 has a handler (SA_RESTART) that counts; SIGRTMIN+5 is blocked in
 * every thread and is what the sigwaitinfo/sigtimedwait/signalfd waiters wait
 * for.  A test wakes a waiter during a stop by writing to a pipe through
 * /proc/PID/fd/N ("fds") or by tgkill(2) to a waiter's tid ("tids").
 *
 * Commands:
 *   call N    ->  copy_packet(source, N), as vuln
 *   settle    ->  "settled" once every waiter is blocked in its call again
 *                 (polls /proc/self/task/TID/syscall, up to 10 s per waiter;
 *                 restart_syscall counts as the call),
 *                 else "error not blocked: KIND"
 *   counts    ->  "KIND=EINTR/OK/OTHER ..." for every waiter, in table order
 *   tids      ->  "KIND=TID ..."
 *   fds       ->  "epoll=W poll=W read=W": write ends of the pipes that wake
 *                 epoll_inf (and epoll_wait_inf), poll_inf, read_pipe
 *   handled   ->  how many SIGUSR1 the handler ran
 *   epoll_main -> the main thread itself waits in epoll_wait(-1) on an empty
 *                 epoll instance, once: "epoll R ERRNO" when it returns
 *                 (only a stop can end it; the main thread is the one the
 *                 engine borrows for its remote system calls)
 *   quit      ->  "bye" (waiters are not joined: exit ends them)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"
#include "vuln.h"

#define HOUR 3600
#define WAKE_SIG (SIGRTMIN + 5)

static char source[4096];
static int epfd, epoll_pipe[2], poll_pipe[2], read_pipe[2], listen_fd, dgram_fd, sig_fd;
static int ring_fd = -1, sem_id = -1, msg_id = -1;
static pid_t child;
static atomic_int futex_word;
static pthread_mutex_t cond_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static atomic_long handled;
static sigset_t wake_set;

struct kind {
    const char *name;
    long nr;            /* the system call it blocks in */
    long (*call)(void); /* one call: its result, or -1 with errno */
    int usable;
    atomic_int tid;
    atomic_long eintr, ok, other;
};

static long c_epoll_wait_inf(void)
{
    struct epoll_event ev;
    long r = syscall(SYS_epoll_wait, epfd, &ev, 1, -1);
    char c;
    if (r > 0 && read(epoll_pipe[0], &c, 1) != 1)
        return -1;
    return r;
}
static long c_epoll_wait_timed(void)
{
    static int empty = -1;
    struct epoll_event ev;
    if (empty < 0)
        empty = epoll_create1(0);
    return syscall(SYS_epoll_wait, empty, &ev, 1, HOUR * 1000);
}
static long c_epoll_pwait_inf(void)
{
    static int empty = -1;
    struct epoll_event ev;
    sigset_t mask;
    if (empty < 0)
        empty = epoll_create1(0);
    pthread_sigmask(SIG_SETMASK, NULL, &mask);
    return syscall(SYS_epoll_pwait, empty, &ev, 1, -1, &mask, _NSIG / 8);
}
static long c_epoll_pwait2_inf(void)
{
    static int empty = -1;
    struct epoll_event ev;
    if (empty < 0)
        empty = epoll_create1(0);
    return syscall(SYS_epoll_pwait2, empty, &ev, 1, NULL, NULL, _NSIG / 8);
}
static long c_epoll_pwait2_timed(void)
{
    static int empty = -1;
    struct epoll_event ev;
    struct timespec ts = {HOUR, 0};
    if (empty < 0)
        empty = epoll_create1(0);
    return syscall(SYS_epoll_pwait2, empty, &ev, 1, &ts, NULL, _NSIG / 8);
}
static long c_sigwaitinfo(void)
{
    siginfo_t info;
    return syscall(SYS_rt_sigtimedwait, &wake_set, &info, NULL, _NSIG / 8);
}
static long c_sigtimedwait(void)
{
    siginfo_t info;
    struct timespec ts = {HOUR, 0};
    return syscall(SYS_rt_sigtimedwait, &wake_set, &info, &ts, _NSIG / 8);
}
static long c_pause(void) { return syscall(SYS_pause); }
static long c_sigsuspend(void)
{
    sigset_t mask;
    pthread_sigmask(SIG_SETMASK, NULL, &mask);
    return syscall(SYS_rt_sigsuspend, &mask, _NSIG / 8);
}
static long c_nanosleep(void)
{
    struct timespec ts = {HOUR, 0};
    return syscall(SYS_nanosleep, &ts, NULL);
}
static long c_clock_nanosleep_rel(void)
{
    struct timespec ts = {HOUR, 0};
    return syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &ts, NULL);
}
static long c_clock_nanosleep_abs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += HOUR;
    return syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}
static long c_poll_inf(void)
{
    struct pollfd p = {poll_pipe[0], POLLIN, 0};
    long r = syscall(SYS_poll, &p, 1, -1);
    char c;
    if (r > 0 && read(poll_pipe[0], &c, 1) != 1)
        return -1;
    return r;
}
static long c_poll_timed(void)
{
    struct pollfd p = {poll_pipe[0], 0, 0};
    return syscall(SYS_poll, &p, 1, HOUR * 1000);
}
static long c_ppoll_inf(void)
{
    struct pollfd p = {poll_pipe[0], 0, 0};
    return syscall(SYS_ppoll, &p, 1, NULL, NULL, _NSIG / 8);
}
static long c_select_timed(void)
{
    struct timeval tv = {HOUR, 0};
    return syscall(SYS_select, 0, NULL, NULL, NULL, &tv);
}
static long c_pselect_inf(void)
{
    return syscall(SYS_pselect6, 0, NULL, NULL, NULL, NULL, NULL);
}
static long c_read_pipe(void)
{
    char c;
    return syscall(SYS_read, read_pipe[0], &c, 1);
}
static long c_accept(void)
{
    long r = syscall(SYS_accept, listen_fd, NULL, NULL);
    if (r >= 0)
        close((int)r);
    return r;
}
static long c_recv_rcvtimeo(void)
{
    char c;
    return syscall(SYS_recvfrom, dgram_fd, &c, 1, 0, NULL, NULL);
}
static long c_recvmmsg_timed(void)
{
    static int sock = -1;
    char c;
    struct iovec iov = {&c, 1};
    struct mmsghdr m = {.msg_hdr = {.msg_iov = &iov, .msg_iovlen = 1}};
    struct timespec ts = {HOUR, 0};
    if (sock < 0)
        sock = socket(AF_UNIX, SOCK_DGRAM, 0);
    return syscall(SYS_recvmmsg, sock, &m, 1, 0, &ts);
}
static long c_signalfd_read(void)
{
    struct signalfd_siginfo si;
    return syscall(SYS_read, sig_fd, &si, sizeof si);
}
static long c_futex_inf(void)
{
    return syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
}
static long c_futex_timed(void)
{
    static atomic_int word;
    struct timespec ts = {HOUR, 0};
    return syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
}
static long c_cond(void)
{
    pthread_mutex_lock(&cond_lock);
    int r = pthread_cond_wait(&cond, &cond_lock);
    pthread_mutex_unlock(&cond_lock);
    errno = r;
    return r ? -1 : 0;
}
static long c_semop(void)
{
    struct sembuf op = {0, -1, 0};
    return syscall(SYS_semop, sem_id, &op, 1);
}
static long c_semtimedop(void)
{
    struct sembuf op = {1, -1, 0};
    struct timespec ts = {HOUR, 0};
    return syscall(SYS_semtimedop, sem_id, &op, 1, &ts);
}
static long c_semtimedop_inf(void)
{
    struct sembuf op = {1, -1, 0};
    return syscall(SYS_semtimedop, sem_id, &op, 1, NULL);
}
static long c_msgrcv(void)
{
    struct {
        long type;
        char text[8];
    } msg;
    return syscall(SYS_msgrcv, msg_id, &msg, sizeof msg.text, 0, 0);
}
static long c_waitid(void)
{
    siginfo_t info;
    return syscall(SYS_waitid, P_PID, child, &info, WEXITED | WNOWAIT, NULL);
}
static long c_wait4(void)
{
    int status;
    return syscall(SYS_wait4, child, &status, __WALL, NULL);
}
static long c_io_uring_enter(void)
{
    return syscall(SYS_io_uring_enter, ring_fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
}

static struct kind kinds[] = {
    {"epoll_wait_inf", SYS_epoll_wait, c_epoll_wait_inf, 1},
    {"epoll_wait_timed", SYS_epoll_wait, c_epoll_wait_timed, 1},
    {"epoll_pwait_inf", SYS_epoll_pwait, c_epoll_pwait_inf, 1},
    {"epoll_pwait2_inf", SYS_epoll_pwait2, c_epoll_pwait2_inf, 1},
    {"epoll_pwait2_timed", SYS_epoll_pwait2, c_epoll_pwait2_timed, 1},
    {"sigwaitinfo", SYS_rt_sigtimedwait, c_sigwaitinfo, 1},
    {"sigtimedwait", SYS_rt_sigtimedwait, c_sigtimedwait, 1},
    {"pause", SYS_pause, c_pause, 1},
    {"sigsuspend", SYS_rt_sigsuspend, c_sigsuspend, 1},
    {"nanosleep", SYS_nanosleep, c_nanosleep, 1},
    {"clock_nanosleep_rel", SYS_clock_nanosleep, c_clock_nanosleep_rel, 1},
    {"clock_nanosleep_abs", SYS_clock_nanosleep, c_clock_nanosleep_abs, 1},
    {"poll_inf", SYS_poll, c_poll_inf, 1},
    {"poll_timed", SYS_poll, c_poll_timed, 1},
    {"ppoll_inf", SYS_ppoll, c_ppoll_inf, 1},
    {"select_timed", SYS_select, c_select_timed, 1},
    {"pselect_inf", SYS_pselect6, c_pselect_inf, 1},
    {"read_pipe", SYS_read, c_read_pipe, 1},
    {"accept", SYS_accept, c_accept, 1},
    {"recv_rcvtimeo", SYS_recvfrom, c_recv_rcvtimeo, 1},
    {"recvmmsg_timed", SYS_recvmmsg, c_recvmmsg_timed, 1},
    {"signalfd_read", SYS_read, c_signalfd_read, 1},
    {"futex_inf", SYS_futex, c_futex_inf, 1},
    {"futex_timed", SYS_futex, c_futex_timed, 1},
    {"cond", SYS_futex, c_cond, 1},
    {"semop", SYS_semop, c_semop, 0},
    {"semtimedop", SYS_semtimedop, c_semtimedop, 0},
    {"semtimedop_inf", SYS_semtimedop, c_semtimedop_inf, 0},
    {"msgrcv", SYS_msgrcv, c_msgrcv, 0},
    {"waitid", SYS_waitid, c_waitid, 1},
    {"wait4", SYS_wait4, c_wait4, 1},
    {"io_uring_enter", SYS_io_uring_enter, c_io_uring_enter, 0},
};
#define NKINDS (sizeof kinds / sizeof kinds[0])

static void on_usr1(int sig)
{
    (void)sig;
    handled++;
}

/* Wait (up to 10 s) until a waiter is blocked in its call, or in restart_syscall: what a
 * call with a timeout becomes once the kernel restarted it (-ERESTART_RESTARTBLOCK). */
static int parked(const struct kind *k)
{
    struct timespec ts = {0, 1000000};
    for (int i = 0; i < 10000; i++) {
        long nr = proto_thread_syscall(k->tid);
        if (nr == k->nr || nr == SYS_restart_syscall)
            return 1;
        nanosleep(&ts, NULL);
    }
    return 0;
}

static void *waiter(void *arg)
{
    struct kind *k = arg;
    k->tid = proto_gettid();
    for (;;) {
        long r = k->call();
        if (r >= 0)
            k->ok++;
        else if (errno == EINTR)
            k->eintr++;
        else {
            k->other++;
            usleep(1000); /* a broken kind must not spin */
        }
    }
    return NULL;
}

static int setup(void)
{
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART};
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {HOUR, 0};
    struct epoll_event ev = {.events = EPOLLIN};
    struct io_uring_params params;

    sigemptyset(&wake_set);
    sigaddset(&wake_set, WAKE_SIG);
    if (sigaction(SIGUSR1, &sa, NULL) || pthread_sigmask(SIG_BLOCK, &wake_set, NULL))
        return -1;
    if (pipe(epoll_pipe) || pipe(poll_pipe) || pipe(read_pipe))
        return -1;
    epfd = epoll_create1(0);
    ev.data.fd = epoll_pipe[0];
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, epoll_pipe[0], &ev))
        return -1;
    listen_fd = socket(AF_UNIX, SOCK_STREAM, 0); /* abstract address: nothing on disk */
    snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "micropatch-waiters-%d", getpid());
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) ||
        listen(listen_fd, 1))
        return -1;
    dgram_fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (dgram_fd < 0 || setsockopt(dgram_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv))
        return -1;
    sig_fd = signalfd(-1, &wake_set, 0);
    if (sig_fd < 0)
        return -1;
    if (unshare(CLONE_NEWIPC) == 0) {
        sem_id = semget(IPC_PRIVATE, 2, 0600);
        msg_id = msgget(IPC_PRIVATE, 0600);
        for (size_t i = 0; i < NKINDS; i++)
            if (kinds[i].nr == SYS_semop || kinds[i].nr == SYS_semtimedop)
                kinds[i].usable = sem_id >= 0;
            else if (kinds[i].nr == SYS_msgrcv)
                kinds[i].usable = msg_id >= 0;
    }
    memset(&params, 0, sizeof params);
    ring_fd = (int)syscall(SYS_io_uring_setup, 4, &params);
    kinds[NKINDS - 1].usable = ring_fd >= 0;
    child = fork(); /* waited for by waitid and wait4; dies with us */
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1)
            _exit(0);
        for (;;)
            pause();
    }
    return child < 0 ? -1 : 0;
}

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    for (size_t i = 0; i < sizeof source; i++)
        source[i] = (char)(i * 7 + 1);
    if (setup()) {
        perror("setup");
        return 1;
    }
    for (size_t i = 0; i < NKINDS; i++) {
        pthread_t thread;
        if (kinds[i].usable && pthread_create(&thread, NULL, waiter, &kinds[i])) {
            perror("pthread_create");
            return 1;
        }
    }
    for (size_t i = 0; i < NKINDS; i++)
        while (kinds[i].usable && !kinds[i].tid)
            usleep(100);
    for (size_t i = 0; i < NKINDS; i++)
        if (kinds[i].usable && !parked(&kinds[i])) {
            fprintf(stderr, "waiter %s never blocked\n", kinds[i].name);
            return 1;
        }
    proto_ready();
    while (proto_next(line, sizeof line)) {
        char out[PROTO_LINE_MAX];
        size_t len = 0;
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", copy_packet(source, (int)n));
        else if (proto_is(line, "settle")) {
            const char *late = NULL;
            for (size_t i = 0; i < NKINDS && !late; i++)
                if (kinds[i].usable && !parked(&kinds[i]))
                    late = kinds[i].name;
            if (late)
                proto_reply("error not blocked: %s", late);
            else
                proto_reply("settled");
        } else if (proto_is(line, "counts") || proto_is(line, "tids")) {
            int counts = line[0] == 'c';
            for (size_t i = 0; i < NKINDS && len < sizeof out - 80; i++) {
                if (!kinds[i].usable)
                    continue;
                if (counts)
                    len += (size_t)snprintf(out + len, sizeof out - len, "%s%s=%ld/%ld/%ld",
                                            len ? " " : "", kinds[i].name, kinds[i].eintr,
                                            kinds[i].ok, kinds[i].other);
                else
                    len += (size_t)snprintf(out + len, sizeof out - len, "%s%s=%d",
                                            len ? " " : "", kinds[i].name, kinds[i].tid);
            }
            proto_reply("%s", out);
        } else if (proto_is(line, "fds"))
            proto_reply("epoll=%d poll=%d read=%d", epoll_pipe[1], poll_pipe[1], read_pipe[1]);
        else if (proto_is(line, "epoll_main")) {
            struct epoll_event ev;
            int empty = epoll_create1(0);
            long r = syscall(SYS_epoll_wait, empty, &ev, 1, -1);
            int e = r < 0 ? errno : 0;
            close(empty);
            proto_reply("epoll %ld %d", r, e);
        } else if (proto_is(line, "handled"))
            proto_reply("%ld", handled);
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
