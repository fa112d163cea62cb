/* forker: children forked before and after a patch.
 *
 * Patched function: copy_packet, the same vuln_fn.c as vuln (see vuln.c for
 * its instructions, sites and fix; PIE offsets apply).
 *
 * Commands:
 *   call N   ->  copy_packet(source, N) in this process
 *   fork N   ->  fork(); the child computes copy_packet(source, N), sends
 *                it back through a pipe and _exits; the parent waits and
 *                answers "child <result>" (or "child failed signal <sig>" /
 *                "child failed exit <code>").  A child forked after a patch
 *                inherits the patched pages.
 *   forkexec ->  fork(); the child execs /bin/sh, which kills itself with SIGSEGV;
 *                the parent answers "child failed signal 11" (a crash of another
 *                program, not of this one's code).
 *   spawn    ->  forks a long-lived child, "spawned <pid>".  Patch the
 *                parent after spawn: the child is a separate process.
 *   ccall N  ->  the spawned child computes copy_packet(source, N),
 *                "ccall <result>"
 *   reap     ->  ends the spawned child, "reaped exit <code>" or
 *                "reaped signal <sig>"
 *   quit     ->  reaps the spawned child if any, "bye"
 * Children never touch stdio: they talk over pipes, so each command is
 * answered exactly once, by the parent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proto.h"
#include "vuln.h"

static char source[4096];

/* The long-lived child made by "spawn": reads ints from cmd, writes results. */
static pid_t spawned = -1;
static int spawn_cmd = -1, spawn_res = -1;

static int read_full(int fd, void *buf, size_t size)
{
    size_t done = 0;
    while (done < size) {
        ssize_t n = read(fd, (char *)buf + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        done += (size_t)n;
    }
    return 1;
}

static void describe_exit(char *out, size_t size, int status)
{
    if (WIFEXITED(status))
        snprintf(out, size, "exit %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, size, "signal %d", WTERMSIG(status));
    else
        snprintf(out, size, "status %d", status);
}

/* "fork N": a child computes copy_packet(N) and exits. */
static void fork_call(int n)
{
    int fds[2];
    int result, status;
    char how[64];

    if (pipe(fds)) {
        proto_reply("error pipe failed");
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        proto_reply("error fork failed");
        return;
    }
    if (pid == 0) {
        close(fds[0]);
        result = copy_packet(source, n);
        _exit(write(fds[1], &result, sizeof result) == sizeof result ? 0 : 1);
    }
    close(fds[1]);
    int got = read_full(fds[0], &result, sizeof result);
    close(fds[0]);
    waitpid(pid, &status, 0);
    if (got && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        proto_reply("child %d", result);
    else {
        describe_exit(how, sizeof how, status);
        proto_reply("child failed %s", how);
    }
}

/* "forkexec": a child that execs another program, which crashes. */
static void fork_exec(void)
{
    int status;
    char how[64];

    pid_t pid = fork();
    if (pid < 0) {
        proto_reply("error fork failed");
        return;
    }
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", "kill -SEGV $$", (char *)NULL);
        _exit(127);
    }
    waitpid(pid, &status, 0);
    describe_exit(how, sizeof how, status);
    proto_reply("child failed %s", how);
}

static void spawn(void)
{
    int cmd[2], res[2];

    if (spawned > 0) {
        proto_reply("error already spawned %d", (int)spawned);
        return;
    }
    if (pipe(cmd) || pipe(res)) {
        proto_reply("error pipe failed");
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        proto_reply("error fork failed");
        return;
    }
    if (pid == 0) {
        int n;
        close(cmd[1]);
        close(res[0]);
        while (read_full(cmd[0], &n, sizeof n)) {
            int result = copy_packet(source, n);
            if (write(res[1], &result, sizeof result) != sizeof result)
                _exit(1);
        }
        _exit(0);
    }
    close(cmd[0]);
    close(res[1]);
    spawned = pid;
    spawn_cmd = cmd[1];
    spawn_res = res[0];
    proto_reply("spawned %d", (int)pid);
}

static void child_call(int n)
{
    int result;

    if (spawned < 0)
        proto_reply("error no child");
    else if (write(spawn_cmd, &n, sizeof n) != sizeof n ||
             !read_full(spawn_res, &result, sizeof result))
        proto_reply("error child %d does not answer", (int)spawned);
    else
        proto_reply("ccall %d", result);
}

static int reap(char *how, size_t size)
{
    int status;

    if (spawned < 0)
        return 0;
    close(spawn_cmd);
    close(spawn_res);
    waitpid(spawned, &status, 0);
    describe_exit(how, size, status);
    spawned = -1;
    return 1;
}

int main(void)
{
    char line[PROTO_LINE_MAX], how[64];
    long n;

    proto_init();
    signal(SIGPIPE, SIG_IGN); /* a dead spawned child must give an answer, not kill us */
    for (size_t i = 0; i < sizeof source; i++)
        source[i] = (char)(i * 7 + 1);
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", copy_packet(source, (int)n));
        else if (proto_arg_int(line, "fork", &n))
            fork_call((int)n);
        else if (proto_is(line, "forkexec"))
            fork_exec();
        else if (proto_is(line, "spawn"))
            spawn();
        else if (proto_arg_int(line, "ccall", &n))
            child_call((int)n);
        else if (proto_is(line, "reap")) {
            if (reap(how, sizeof how))
                proto_reply("reaped %s", how);
            else
                proto_reply("error no child");
        } else if (proto_is(line, "quit")) {
            reap(how, sizeof how);
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    reap(how, sizeof how);
    return 0;
}
