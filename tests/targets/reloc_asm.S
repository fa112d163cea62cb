/* Hand-written functions for reloc.c: sites whose displaced instructions need
 * relocation.  See reloc.c for the documentation; keep both in step.
 * Every function is int f(int n) (System V: n in edi, result in eax). */
    .intel_syntax noprefix

    .data
    .p2align 2
    .globl reloc_base
    .type reloc_base, @object
    .size reloc_base, 4
reloc_base:
    .long 1000
    .globl reloc_magic
    .type reloc_magic, @object
    .size reloc_magic, 4
reloc_magic:
    .long 42

    .text

/* reloc_fn: RIP-relative cmp, short jcc and call in its first 13 bytes.
 * n == 42 -> -42, else 3n + 7 + 1000. */
    .p2align 4
    .globl reloc_fn
    .type reloc_fn, @function
reloc_fn:
    cmp edi, DWORD PTR [rip + reloc_magic]  /* +0   3b 3d rel32   (6) */
    je .Lfn_magic                           /* +6   74 rel8       (2) */
    call reloc_helper                       /* +8   e8 rel32      (5) */
.Lfn_ret:
    add eax, DWORD PTR [rip + reloc_base]   /* +13  03 05 rel32   (6) */
    ret                                     /* +19 */
.Lfn_magic:
    mov eax, -42                            /* +20 */
    ret
    .size reloc_fn, . - reloc_fn

/* reloc_rip: a site that is one RIP-relative load.  n + 1000. */
    .p2align 4
    .globl reloc_rip
    .type reloc_rip, @function
reloc_rip:
    mov eax, DWORD PTR [rip + reloc_base]   /* +0   8b 05 rel32   (6) */
    add eax, edi                            /* +6 */
    ret
    .size reloc_rip, . - reloc_rip

/* reloc_rip_imm: RIP-relative operand followed by an imm32, so the
 * displacement is relative to the end of the immediate, not of the disp.
 * n + 2000, or -1000 if the load read the wrong address. */
    .p2align 4
    .globl reloc_rip_imm
    .type reloc_rip_imm, @function
reloc_rip_imm:
    cmp DWORD PTR [rip + reloc_base], 1000  /* +0   81 3d rel32 imm32 (10) */
    jne .Lrip_imm_bad                       /* +10  75 rel8 */
    lea eax, [rdi + 2000]                   /* +12 */
    ret
.Lrip_imm_bad:
    mov eax, -1000
    ret
    .size reloc_rip_imm, . - reloc_rip_imm

/* reloc_jcc: a short conditional branch inside the first site.
 * n == 0 -> -100, else 5n. */
    .p2align 4
    .globl reloc_jcc
    .type reloc_jcc, @function
reloc_jcc:
    test edi, edi                           /* +0   85 ff */
    jz .Ljcc_zero                           /* +2   74 rel8 */
    lea eax, [rdi + rdi*4]                  /* +4   8d 04 bf */
    ret                                     /* +7 */
.Ljcc_zero:
    mov eax, -100
    ret
    .size reloc_jcc, . - reloc_jcc

/* reloc_call: the site's first instruction is a call.  3n + 7, or -999 if
 * the helper was called with a return address other than the original one. */
    .p2align 4
    .globl reloc_call
    .type reloc_call, @function
reloc_call:
    call reloc_helper                       /* +0   e8 rel32      (5) */
.Lcall_ret:
    ret                                     /* +5 */
    .size reloc_call, . - reloc_call

/* reloc_jrcxz: jrcxz has no near form; it must be rewritten.
 * n == 0 -> -5, else n + 5. */
    .p2align 4
    .globl reloc_jrcxz
    .type reloc_jrcxz, @function
reloc_jrcxz:
    mov ecx, edi                            /* +0   89 f9 */
    jrcxz .Ljrcxz_zero                      /* +2   e3 rel8 */
    lea eax, [rdi + 5]                      /* +4   8d 47 05 */
    ret                                     /* +7 */
.Ljrcxz_zero:
    mov eax, -5
    ret
    .size reloc_jrcxz, . - reloc_jrcxz

/* reloc_loop: loop (dec rcx; jump if rcx != 0) has no near form either.
 * n == 1 -> -6, else n + 6. */
    .p2align 4
    .globl reloc_loop
    .type reloc_loop, @function
reloc_loop:
    mov ecx, edi                            /* +0   89 f9 */
    loop .Lloop_nonzero                     /* +2   e2 rel8 */
    mov eax, -6                             /* +4   b8 imm32 */
    ret                                     /* +9 */
.Lloop_nonzero:
    lea eax, [rdi + 6]
    ret
    .size reloc_loop, . - reloc_loop

/* reloc_helper: 3n + 7 when called from reloc_fn+8 or reloc_call+0 with the
 * original return address on the stack; -999 otherwise (a relocated call
 * that pushed a cave address instead). */
    .p2align 4
    .globl reloc_helper
    .type reloc_helper, @function
reloc_helper:
    mov rax, QWORD PTR [rsp]
    lea rcx, [rip + .Lfn_ret]
    cmp rax, rcx
    je 1f
    lea rcx, [rip + .Lcall_ret]
    cmp rax, rcx
    je 1f
    mov eax, -999
    ret
1:  lea eax, [rdi + rdi*2 + 7]
    ret
    .size reloc_helper, . - reloc_helper

    .section .note.GNU-stack, "", @progbits
