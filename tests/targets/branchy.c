/* branchy: branch targets inside candidate sites.
 *
 * Patched function: int branchy(int n) = 1 + 2 + .. + n (0 for n <= 0),
 * hand-written in branchy_asm.S so the layout is fixed:
 *   +0x0  31 c0     xor  eax,eax
 *   +0x2  85 ff     test edi,edi        <- loop head, target of the jmp
 *   +0x4  7e 06     jle  +0xc
 *   +0x6  01 f8     add  eax,edi
 *   +0x8  ff cf     dec  edi
 *   +0xa  eb f6     jmp  +0x2
 *   +0xc  c3        ret                 <- target of the jle
 *   (size 13)
 *
 * Sites an engine must refuse:
 *   +0x0, 6 bytes (xor, test, jle): the loop head +0x2 is inside;
 *   +0x8, 5 bytes (dec, jmp, ret): the jle target +0xc is inside;
 *   +0xa: jmp + ret is only 3 bytes before the function ends.
 * Valid sites:
 *   +0x2, 6 bytes (test, jle, add): the loop head is its first byte, so
 *         every iteration enters the trampoline;
 *   +0x4, 6 bytes (jle, add, dec);
 *   +0x6, 6 bytes (add, dec, jmp): the backward jmp is relocated.
 * Observable patches: at +0x6 "add eax, edi" counts each term twice,
 * call N -> N(N+1); at +0x2 "add eax, 1000" runs N+1 times,
 * call N -> N(N+1)/2 + 1000(N+1) (for N >= 0).
 *
 * Commands: call N -> branchy(N); quit -> bye.
 */
#include "proto.h"

int branchy(int n);

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", branchy((int)n));
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
