/* micropatch.h: the interface of a C patchlet (patch source format v1).
 *
 * A C patchlet defines one function, called by the trampoline at the patched
 * location with the registers the program had there:
 *
 *     mp_verdict patchlet(struct mp_regs *r)
 *     {
 *         if ((int)r->rsi > 64)           // len in esi
 *             return MP_RETURN(-1);       // at a function's entry only
 *         return MP_CONTINUE;
 *     }
 *
 * micropatch includes this header before the code; including it again is
 * harmless. See docs/patch-format.md, "C bodies", for the rules (no global
 * data, no library calls, no floating point).
 */
#ifndef MICROPATCH_H
#define MICROPATCH_H

typedef __UINT64_TYPE__ mp_u64;
typedef __INT64_TYPE__ mp_i64;
typedef __UINT32_TYPE__ mp_u32;
typedef __INT32_TYPE__ mp_i32;
typedef __UINT16_TYPE__ mp_u16;
typedef __INT16_TYPE__ mp_i16;
typedef __UINT8_TYPE__ mp_u8;
typedef __INT8_TYPE__ mp_i8;

/* The registers at the patched location, in the order the trampoline saves
 * them (lowest address first). Changing a field changes that register when
 * execution goes on (continue, jump or return), except:
 *   rsp     read only: the stack pointer at the patched location (at a
 *           function's entry, ((mp_u64 *)r->rsp)[0] is the return address);
 *   rflags  only the arithmetic flags (CF PF AF ZF SF OF) are taken back. */
struct mp_regs {
    mp_u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp;
    mp_u64 r8, r9, r10, r11, r12, r13, r14, r15;
    mp_u64 rflags;
};
_Static_assert(sizeof(struct mp_regs) == 17 * 8, "struct mp_regs is 17 words");

/* What happens after patchlet() returns; returned in rax:rdx. */
typedef struct mp_verdict {
    mp_u64 kind;  /* MP_KIND_* in the low byte, MP_KIND_BLOCKED may be or-ed in */
    mp_u64 value; /* the value to return, or the index into `jumps` */
} mp_verdict;

#define MP_KIND_CONTINUE 0
#define MP_KIND_RETURN 1
#define MP_KIND_JUMP 2
#define MP_KIND_BLOCKED 0x100

/* Go on: the displaced instructions run (or execution resumes at `resume`). */
#define MP_CONTINUE ((mp_verdict){MP_KIND_CONTINUE, 0})
/* Return v (in rax) to the caller. Only in a patchlet at a function's entry. */
#define MP_RETURN(v) ((mp_verdict){MP_KIND_RETURN, (mp_u64)(v)})
/* Jump to the patchlet's jumps[n]. */
#define MP_JUMP(n) ((mp_verdict){MP_KIND_JUMP, (mp_u64)(n)})
/* Count this event as a blocked exploit attempt, then do `verdict`. */
#define MP_BLOCKED(verdict) \
    ((mp_verdict){(verdict).kind | MP_KIND_BLOCKED, (verdict).value})

mp_verdict patchlet(struct mp_regs *r);

#endif
