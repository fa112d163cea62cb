/* frame: a function with a stack frame, for `[frame+N]` in bodies that push and
 * call (docs/patch-format.md, "The body's view of the stack").
 *
 * Patched function: long fr_scale(long n), in frame_asm.S, hand-written so the
 * frame's layout does not depend on the compiler, with .cfi directives:
 *   push rbx; sub rsp, 0x20        CFA = rsp+0x30: return address at [rsp+0x28],
 *                                  the saved rbx at [rsp+0x20]
 *   [rsp+0x8]  = scaled = 2n
 *   [rsp+0x10] = limit = 1000
 *   +0x1a  48 8b 7c 24 08   mov rdi, [rsp+0x8]   the site: 5 bytes, valid
 *   +0x1f  call fr_helper   (x + 1)
 *   +0x24  add rax, [rsp+0x10]
 * so call N -> 2N + 1001.
 *
 * fr_clamp(x) = min(x, 100) (clobbering every caller-saved register) is there
 * for a patchlet to call. A patchlet at fr_scale+0x1a that saves rax and rdi,
 * reads [frame+0x8], calls fr_clamp, writes the result back to [frame+0x8] and
 * 7 to [frame+0x10] makes call N -> min(2N, 100) + 8; a body that pushes and
 * calls mid-function runs 128 bytes below rsp, so any other offset reads or
 * writes the wrong slot and the answer shows it.
 *
 * Commands: call N -> fr_scale(N); quit -> bye.
 */
#include "proto.h"

long fr_scale(long n);

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%ld", fr_scale(n));
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
