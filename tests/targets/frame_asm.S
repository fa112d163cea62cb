/* Hand-written functions for frame.c: a function with a stack frame that calls
 * another, described by .cfi directives (its CFA in .eh_frame). See frame.c for
 * the documentation; keep both in step. */
    .intel_syntax noprefix
    .text

/* long fr_scale(long n): fr_helper(2n) + 1000, through two stack slots. */
    .p2align 4
    .globl fr_scale
    .type fr_scale, @function
fr_scale:
    .cfi_startproc
    push rbx                            /* +0x00  53                CFA rsp+0x10 */
    .cfi_def_cfa_offset 0x10
    .cfi_offset rbx, -0x10
    sub rsp, 0x20                       /* +0x01  48 83 ec 20       CFA rsp+0x30 */
    .cfi_def_cfa_offset 0x30
    mov rbx, rdi                        /* +0x05  48 89 fb */
    lea rax, [rdi+rdi]                  /* +0x08  48 8d 04 3f */
    mov qword ptr [rsp+0x8], rax        /* +0x0c  48 89 44 24 08    scaled = 2n */
    mov qword ptr [rsp+0x10], 1000      /* +0x11  48 c7 44 24 10 e8 03 00 00   limit */
    mov rdi, qword ptr [rsp+0x8]        /* +0x1a  48 8b 7c 24 08    the site */
    call fr_helper                      /* +0x1f  e8 ...             */
    add rax, qword ptr [rsp+0x10]       /* +0x24  48 03 44 24 10 */
    add rsp, 0x20                       /* +0x29  48 83 c4 20 */
    .cfi_def_cfa_offset 0x10
    pop rbx                             /* +0x2d  5b */
    .cfi_def_cfa_offset 0x8
    ret                                 /* +0x2e  c3 */
    .cfi_endproc
    .size fr_scale, . - fr_scale

/* long fr_helper(long x): x + 1. */
    .p2align 4
    .globl fr_helper
    .type fr_helper, @function
fr_helper:
    .cfi_startproc
    lea rax, [rdi+1]
    ret
    .cfi_endproc
    .size fr_helper, . - fr_helper

/* long fr_clamp(long x): x, at most 100; clobbers rcx, rdx, rsi, rdi, r8-r11 as a
 * called function may (the patchlet calling it must save what is live). */
    .p2align 4
    .globl fr_clamp
    .type fr_clamp, @function
fr_clamp:
    .cfi_startproc
    mov eax, 100
    cmp rdi, rax
    cmovl rax, rdi
    mov rcx, -1
    mov rdx, rcx
    mov rsi, rcx
    mov r8, rcx
    mov r9, rcx
    mov r10, rcx
    mov r11, rcx
    mov rdi, rcx
    ret
    .cfi_endproc
    .size fr_clamp, . - fr_clamp

    .section .note.GNU-stack, "", @progbits
