/* Line protocol helpers; see proto.h. */
#define _GNU_SOURCE
#include "proto.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static char stdin_buf[PROTO_LINE_MAX];
static char stdout_buf[PROTO_LINE_MAX];

void proto_init(void)
{
    setvbuf(stdin, stdin_buf, _IOFBF, sizeof stdin_buf);
    setvbuf(stdout, stdout_buf, _IOLBF, sizeof stdout_buf);
#ifdef PR_SET_PTRACER
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0); /* EINVAL without Yama: fine */
#endif
}

void proto_ready(void)
{
    proto_reply("ready %d", (int)getpid());
}

int proto_next(char *line, size_t size)
{
    if (!fgets(line, (int)size, stdin))
        return 0;
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    return 1;
}

void proto_reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    flockfile(stdout);
    vfprintf(stdout, fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    funlockfile(stdout);
    va_end(ap);
}

int proto_arg_int(const char *line, const char *word, long *value)
{
    size_t n = strlen(word);
    if (strncmp(line, word, n) != 0 || line[n] != ' ')
        return 0;
    char *end;
    errno = 0;
    long v = strtol(line + n + 1, &end, 0);
    if (errno || end == line + n + 1 || *end != '\0')
        return 0;
    *value = v;
    return 1;
}

int proto_is(const char *line, const char *word)
{
    return strcmp(line, word) == 0;
}

void proto_unknown(const char *line)
{
    proto_reply("error unknown command: %s", line);
}

int proto_gettid(void)
{
    return (int)syscall(SYS_gettid);
}

int proto_thread_count(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

long proto_thread_syscall(int tid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -2;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -2;
    buf[n] = '\0';
    if (strncmp(buf, "running", 7) == 0)
        return -1;
    return strtol(buf, NULL, 10);
}

int proto_wait_blocked(int tid, long nr)
{
    struct timespec ts = {0, 1000000}; /* 1 ms, up to 10 s */
    for (int i = 0; i < 10000; i++) {
        if (proto_thread_syscall(tid) == nr)
            return 1;
        nanosleep(&ts, NULL);
    }
    return 0;
}
