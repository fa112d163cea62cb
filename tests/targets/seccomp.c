/* seccomp: a process whose seccomp filter denies mmap and memfd_create.
 *
 * Patched function: copy_packet, the same vuln_fn.c as vuln (see vuln.c for
 * its instructions, sites and fix; PIE offsets apply).
 *
 * Before "ready": PR_SET_NO_NEW_PRIVS, then a SECCOMP_MODE_FILTER program
 * that returns EPERM for mmap(2) and memfd_create(2) on x86-64, kills the
 * process for any other architecture, and allows everything else.  The
 * filter applies to syscalls a tracer injects too, so a remote mmap of the
 * cave fails with -EPERM: the engine must fail clearly, target untouched.
 * stdio uses static buffers (proto_init), so the target itself never needs
 * a new mapping.
 *
 * Commands:
 *   call N    ->  copy_packet(source, N), as vuln
 *   trymmap   ->  "mmap EPERM" (or "mmap ok" / "mmap <strerror>")
 *   trymemfd  ->  "memfd EPERM" (or "memfd ok" / "memfd <strerror>")
 *   seccomp   ->  "seccomp <n>", the Seccomp: field of /proc/self/status (2)
 *   quit      ->  bye
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "proto.h"
#include "vuln.h"

static char source[4096];

static int install_filter(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mmap, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_memfd_create, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
    };
    struct sock_fprog prog = {
        .len = (unsigned short)(sizeof filter / sizeof filter[0]),
        .filter = filter,
    };

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}

static const char *errno_name(int e)
{
    return e == EPERM ? "EPERM" : strerror(e);
}

/* The "Seccomp:" field of /proc/self/status (2 = filter). */
static int seccomp_mode(void)
{
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *field = strstr(buf, "\nSeccomp:");
    return field ? atoi(field + strlen("\nSeccomp:")) : -1;
}

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    /* Static stdio buffers: nothing below needs a new mapping. */
    proto_init();
    for (size_t i = 0; i < sizeof source; i++)
        source[i] = (char)(i * 7 + 1);
    if (install_filter()) {
        perror("seccomp");
        return 1;
    }
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", copy_packet(source, (int)n));
        else if (proto_is(line, "trymmap")) {
            void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED)
                proto_reply("mmap %s", errno_name(errno));
            else {
                munmap(p, 4096);
                proto_reply("mmap ok");
            }
        } else if (proto_is(line, "trymemfd")) {
            int fd = (int)syscall(SYS_memfd_create, "micropatch-test", 0);
            if (fd < 0)
                proto_reply("memfd %s", errno_name(errno));
            else {
                close(fd);
                proto_reply("memfd ok");
            }
        } else if (proto_is(line, "seccomp"))
            proto_reply("seccomp %d", seccomp_mode());
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
