/* Hand-written function for branchy.c: branch targets near the start.
 * See branchy.c for the documentation; keep both in step. */
    .intel_syntax noprefix
    .text

/* int branchy(int n): 1 + 2 + ... + n, or 0 when n <= 0. */
    .p2align 4
    .globl branchy
    .type branchy, @function
branchy:
    xor eax, eax            /* +0   31 c0 */
.Lhead:                     /* +2   target of the backward jmp */
    test edi, edi           /* +2   85 ff */
    jle .Ldone              /* +4   7e 06 */
    add eax, edi            /* +6   01 f8 */
    dec edi                 /* +8   ff cf */
    jmp .Lhead              /* +10  eb f6 */
.Ldone:                     /* +12  target of the forward jle */
    ret                     /* +12  c3 */
    .size branchy, . - branchy

    .section .note.GNU-stack, "", @progbits
