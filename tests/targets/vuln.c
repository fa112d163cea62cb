/* vuln: the classic micropatch target.
 *
 * Patched function: int copy_packet(const char *buf, int len), in vuln_fn.c
 * (its own translation unit; noinline, noclone, exported).  It copies len
 * bytes into a 64-byte static buffer, and misses the upper bound check.
 * Rather than corrupt memory it reports the overflow it would have caused
 * with -2, so tests observe the bug safely.
 *
 * Commands:
 *   call N  ->  copy_packet(source, N): N for 0 <= N <= 64, -1 for N < 0,
 *               -2 for N > 64 ("would have overflowed")
 *   quit    ->  bye
 *
 * Built three ways from this file: vuln_pie (-fPIE -pie); vuln_nopie
 * (-fno-pie -no-pie, load base 0x400000, module offset = vaddr - 0x400000);
 * vuln_lib_main + libvuln.so, where copy_packet lives only in the library
 * (rpath $ORIGIN).  blocker, forker and seccomp link the same vuln_fn.c.
 *
 * gcc 12.2 -O2 (Debian 12.2.0-14), objdump -d -M intel, offsets from
 * copy_packet.  PIE executables and libvuln.so; non-PIE where different:
 *   +0x00  85 f6                 test esi,esi
 *   +0x02  0f 88 ae 00 00 00     js   +0xb6              non-PIE: 0f 88 a6.. -> +0xae
 *   +0x08  83 fe 40              cmp  esi,0x40
 *   +0x0b  0f 8f 9f 00 00 00     jg   +0xb0              non-PIE: 0f 8f 97.. -> +0xa8
 *   +0x11  48 8d 15 <rel32>      lea  rdx,[rip+packet_buf]
 *                                         non-PIE: b9 <abs32>  mov ecx,packet_buf (5 bytes)
 *   +0x18  48 89 f8              mov  rax,rdi
 *   +0x1b  48 89 d1              mov  rcx,rdx
 *   +0x1e  83 fe 08              cmp  esi,0x8
 *   ...    the inlined memcpy; its branches land on +0x23 .. +0x89
 *   +0xb0  b8 fe ff ff ff / c3   return -2               non-PIE +0xa8
 *   +0xb6  b8 ff ff ff ff / c3   return -1 (error path)  non-PIE +0xae
 *
 * Sites (no branch lands inside them):
 *   +0x0, 8 bytes: test + js rel32
 *   +0x8, 9 bytes: cmp + jg rel32    <- where the bounds check belongs
 *   +0x11, 7 bytes (PIE/.so): lea rip-relative
 * Module offset of copy_packet: read it from the symbol table
 * (targets.symbol("vuln_pie", "copy_packet").offset); when this was written
 * it was 0x14b0 in vuln_pie, 0x1480 in vuln_nopie, 0x1100 in libvuln.so.
 *
 * Fixes that change the answer observably (call 65: -2 unpatched, -1 patched;
 * call 10 stays 10):
 *   at +0x8:  cmp esi, 64; jg <copy_packet+0xb6>  (the existing error path,
 *             +0xae in vuln_nopie), then the displaced cmp/jg run as before;
 *   at +0x0:  cmp esi, 64; jle ok; mov esi, -1; ok:  (the displaced test/js
 *             then take the error path), no jump target needed.
 */
#include <stdio.h>

#include "proto.h"
#include "vuln.h"

static char source[4096];

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    for (size_t i = 0; i < sizeof source; i++)
        source[i] = (char)(i * 7 + 1);
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", copy_packet(source, (int)n));
        else if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
