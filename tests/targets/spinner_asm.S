/* Hand-written functions for spinner.c: threads whose instruction pointer is
 * inside a site.  See spinner.c for the documentation; keep both in step. */
    .intel_syntax noprefix
    .text

/* int hot(int x): 3x + 1.  The two pauses are slow, so a thread running hot
 * is most often stopped at +2 or +4: inside the site at +0. */
    .p2align 4
    .globl hot
    .type hot, @function
hot:
    mov eax, edi                /* +0   89 f8 */
    pause                       /* +2   f3 90 */
    pause                       /* +4   f3 90 */
    lea eax, [rax + rax*2 + 1]  /* +6   8d 44 40 01 */
    ret                         /* +10  c3 */
    .size hot, . - hot

/* long stuck_read(int fd, void *buf, size_t count): raw read(2).  A thread
 * blocked here has rip = +4 (past the syscall), and the kernel restarts an
 * interrupted read at +2: both inside the site at +0. */
    .p2align 4
    .globl stuck_read
    .type stuck_read, @function
stuck_read:
    xor eax, eax                /* +0   31 c0   SYS_read */
    syscall                     /* +2   0f 05 */
    ret                         /* +4   c3 */
    .size stuck_read, . - stuck_read

    .section .note.GNU-stack, "", @progbits
