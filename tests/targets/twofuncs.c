/* twofuncs: two patched functions in two translation units.
 *
 * Patched functions (each in its own file; noinline, noclone, exported):
 *   int check_a(int x) = x + 1000      (twofuncs_a.c)
 *     +0x0  8d 87 e8 03 00 00      lea eax,[rdi+0x3e8]
 *     +0x6  c3                     ret
 *   int check_b(int x) = 7x - 3        (twofuncs_b.c)
 *     +0x0  8d 04 fd 00 00 00 00   lea eax,[rdi*8+0x0]
 *     +0x7  29 f8                  sub eax,edi
 *     +0x9  83 e8 03               sub eax,0x3
 *     +0xc  c3                     ret
 * Sites: check_a+0x0 (6 bytes), check_b+0x0 (7 bytes).
 * Observable patch: "add edi, 1" at each site: a N -> N + 1001,
 * b N -> 7N + 4.  For atomicity, one patch with both patchlets: if either
 * fails (say wrong expected bytes at check_b), a N must still be N + 1000.
 *
 * Commands: a N -> check_a(N); b N -> check_b(N); quit -> bye.
 */
#include "proto.h"

int check_a(int x);
int check_b(int x);

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "a", &n))
            proto_reply("%d", check_a((int)n));
        else if (proto_arg_int(line, "b", &n))
            proto_reply("%d", check_b((int)n));
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
