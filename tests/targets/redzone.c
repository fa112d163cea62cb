/* redzone: a leaf function whose locals live in the red zone.
 *
 * Patched function: long rz_sum(long n), in redzone_fn.c (its own
 * translation unit; noinline, noclone, exported).  A leaf that stores
 * volatile long a[14], a[i] = n + i, in the red zone and returns their sum,
 * 14n + 91.  No "sub rsp", no push, no call: a[i] is at [rsp-0x78+8*i], so
 * a[0] at [rsp-0x78] .. a[13] at [rsp-0x10]; [rsp-0x8] is unused (gcc keeps
 * the array 16-byte aligned), so one push or one call alone clobbers nothing.
 *
 * gcc 12.2 -O2, offsets from rz_sum (straight-line code, no branches):
 *   +0x00  48 8d 47 01         lea  rax,[rdi+0x1]
 *   +0x04  48 89 7c 24 88      mov  QWORD PTR [rsp-0x78],rdi      a[0]
 *   +0x09  48 89 44 24 90      mov  QWORD PTR [rsp-0x70],rax      a[1]
 *   +0x0e  48 8d 47 02         lea  rax,[rdi+0x2]
 *   ...    lea rax,[rdi+i]; mov [rsp-0x78+8*i],rax
 *   +0x68  48 8d 47 0c         lea  rax,[rdi+0xc]
 *   +0x6c  48 83 c7 0d         add  rdi,0xd
 *   +0x70  48 89 44 24 e8      mov  QWORD PTR [rsp-0x18],rax      a[12]
 *   +0x75  48 89 7c 24 f0      mov  QWORD PTR [rsp-0x10],rdi      a[13]
 *   +0x7a  48 8b 44 24 88      mov  rax,QWORD PTR [rsp-0x78]      first load
 *   +0x7f  48 8b 54 24 90      mov  rdx,QWORD PTR [rsp-0x70]
 *   +0x84  48 01 d0            add  rax,rdx
 *   ...    mov rdx,[rsp-0x78+8*i]; add rax,rdx
 *   +0xdf  48 8b 54 24 f0      mov  rdx,QWORD PTR [rsp-0x10]      a[13]
 *   +0xe4  48 01 d0            add  rax,rdx
 *   +0xe7  c3                  ret
 *
 * Sites (all valid):
 *   +0x00, 9 bytes (lea + mov): entry, the red zone holds nothing yet.
 *          Patchlet "add rdi, 1000": call N -> 14(N+1000) + 91.
 *   +0x7a, 5 bytes: all 14 slots live, rax = n + 12.  Patchlet
 *          "push rax; push rax; pop rax; pop rax": call N stays 14N + 91 if
 *          the engine stepped over the red zone; 14N + 90 if the second push
 *          overwrote a[13].
 *   +0xdf, 5 bytes: rax = a[0] + .. + a[12] = 13n + 78, a[13] still live.
 *          Patchlet "push rax; push rax; pop rax; pop rax; add rax, 1000":
 *          14N + 1091 when right, 26N + 1156 when a[13] was clobbered.
 *
 * Commands: call N -> rz_sum(N); quit -> bye.
 */
#include "proto.h"

long rz_sum(long n);

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%ld", rz_sum(n));
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
