/* np_fdmap LIBRARY OFFSET: a load the agent cannot hold. Opens LIBRARY, says
 * "opened" and waits for a line; then maps its PT_LOAD segments from that
 * descriptor as ld.so would (no new open: no fanotify permission event), says
 * "mapped" and waits for a line; then calls the function at module offset OFFSET
 * (copy_packet: its -2 and -1 paths need no relocation) with (buf, 65) and prints
 * the result: -2 unpatched, -1 patched (tests/integration/test_coverage.py: the
 * agent, started after the open, patches it live once it is mapped). */
#include <elf.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static char buf[128];

static int wait_line(void)
{
    char line[16];
    return fgets(line, sizeof line, stdin) != NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 2;
    unsigned long offset = strtoul(argv[2], NULL, 0);
    printf("opened\n");
    fflush(stdout);
    if (!wait_line())
        return 3;
    Elf64_Ehdr eh;
    Elf64_Phdr ph[32];
    if (pread(fd, &eh, sizeof eh, 0) != sizeof eh || eh.e_phnum > 32)
        return 4;
    if (pread(fd, ph, eh.e_phnum * sizeof *ph, eh.e_phoff) != (ssize_t)(eh.e_phnum * sizeof *ph))
        return 4;
    unsigned long lo = ~0UL, hi = 0;
    for (int i = 0; i < eh.e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD)
            continue;
        if ((ph[i].p_vaddr & ~(PAGE - 1)) < lo)
            lo = ph[i].p_vaddr & ~(PAGE - 1);
        if (ph[i].p_vaddr + ph[i].p_memsz > hi)
            hi = ph[i].p_vaddr + ph[i].p_memsz;
    }
    char *base = mmap(NULL, hi - lo, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return 5;
    for (int i = 0; i < eh.e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD)
            continue;
        int prot = (ph[i].p_flags & PF_R ? PROT_READ : 0) | (ph[i].p_flags & PF_W ? PROT_WRITE : 0)
                   | (ph[i].p_flags & PF_X ? PROT_EXEC : 0);
        unsigned long skew = ph[i].p_vaddr & (PAGE - 1);
        char *at = base + (ph[i].p_vaddr - skew) - lo;
        if (mmap(at, ph[i].p_filesz + skew, prot, MAP_PRIVATE | MAP_FIXED, fd,
                 ph[i].p_offset - skew) == MAP_FAILED)
            return 5;
    }
    printf("mapped\n");
    fflush(stdout);
    if (!wait_line())
        return 3;
    int (*copy)(const char *, int) = (int (*)(const char *, int))(base - lo + offset);
    printf("%d\n", copy(buf, 65));
    return 0;
}
