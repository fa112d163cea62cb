/* reloc: sites whose displaced instructions need relocation.
 *
 * Patched functions: hand-written in reloc_asm.S (GNU as, Intel syntax),
 * each int f(int n) with n in edi, exported with .type/.size so the
 * engine can find their bounds.  Bytes are fixed by the assembler; rel32
 * values depend on the link.  Offsets from each function:
 *
 * reloc_fn: n == 42 -> -42, else 3n + 1007
 *   +0x00  3b 3d <rel32>   cmp  edi,DWORD PTR [rip+reloc_magic]   (42)
 *   +0x06  74 0c           je   +0x14
 *   +0x08  e8 <rel32>      call reloc_helper
 *   +0x0d  03 05 <rel32>   add  eax,DWORD PTR [rip+reloc_base]    (1000)
 *   +0x13  c3              ret
 *   +0x14  b8 d6 ff ff ff  mov  eax,-42
 *   +0x19  c3              ret
 *   Sites: +0x0 (6 bytes, RIP-relative cmp); +0x0 with 13 bytes (cmp + je
 *   + call: all three kinds, if a patch asks for a longer site); +0x6
 *   (7 bytes, je + call); +0x8 (5 bytes, call).  At +0x6 and +0x8 the flags
 *   are live: a patchlet must keep them, e.g. "lea edi,[rdi+1]" -> for
 *   n != 42 the answer becomes 3n + 1010.
 *
 * reloc_rip: n + 1000
 *   +0x00  8b 05 <rel32>   mov  eax,DWORD PTR [rip+reloc_base]
 *   +0x06  01 f8           add  eax,edi
 *   +0x08  c3              ret
 *   Site: +0x0, 6 bytes.
 *
 * reloc_rip_imm: n + 2000; -1000 if the relocated load read the wrong address
 *   +0x00  81 3d <rel32> e8 03 00 00   cmp DWORD PTR [rip+reloc_base],0x3e8
 *   +0x0a  75 07           jne  +0x13
 *   +0x0c  8d 87 d0 07 00 00  lea eax,[rdi+0x7d0]
 *   +0x12  c3              ret
 *   +0x13  b8 18 fc ff ff  mov  eax,-1000
 *   +0x18  c3              ret
 *   Site: +0x0, 10 bytes.  The disp32 is relative to the end of the imm32,
 *   4 bytes past the end of the displacement itself.
 *
 * reloc_jcc: n == 0 -> -100, else 5n
 *   +0x00  85 ff           test edi,edi
 *   +0x02  74 04           je   +0x8
 *   +0x04  8d 04 bf        lea  eax,[rdi+rdi*4]
 *   +0x07  c3              ret
 *   +0x08  b8 9c ff ff ff  mov  eax,-100
 *   +0x0d  c3              ret
 *   Sites: +0x0, 7 bytes (test + je + lea); +0x2, 5 bytes (starts with the
 *   je; flags live: "lea edi,[rdi+1]" -> 5n + 5 for n != 0, -100 for 0).
 *
 * reloc_call: 3n + 7; -999 if reloc_helper saw a return address other than
 * reloc_call+5 (a relocated call must push the original return address)
 *   +0x00  e8 <rel32>      call reloc_helper
 *   +0x05  c3              ret
 *   Site: +0x0, 5 bytes, the call first.
 *
 * reloc_jrcxz: n == 0 -> -5, else n + 5 (jrcxz has no rel32 form)
 *   +0x00  89 f9           mov  ecx,edi
 *   +0x02  e3 04           jrcxz +0x8
 *   +0x04  8d 47 05        lea  eax,[rdi+0x5]
 *   +0x07  c3              ret
 *   +0x08  b8 fb ff ff ff  mov  eax,-5
 *   +0x0d  c3              ret
 *   Site: +0x0, 7 bytes.
 *
 * reloc_loop: n == 1 -> -6, else n + 6 (loop: dec rcx, jump if not zero;
 * no rel32 form either)
 *   +0x00  89 f9           mov  ecx,edi
 *   +0x02  e2 06           loop +0xa
 *   +0x04  b8 fa ff ff ff  mov  eax,-6
 *   +0x09  c3              ret
 *   +0x0a  8d 47 06        lea  eax,[rdi+0x6]
 *   +0x0d  c3              ret
 *   Site: +0x0, 9 bytes.
 *
 * reloc_helper (not a site): returns 3n + 7 if its return address is
 * reloc_fn+0xd or reloc_call+0x5, else -999.  Clobbers rax, rcx.
 *
 * The observable patch for any site at +0x0: patchlet "add edi, 1", the
 * answer becomes f(n + 1).
 *
 * Commands: call N -> reloc_fn(N); <function> N -> that function's result
 * (reloc_fn, reloc_rip, reloc_rip_imm, reloc_jcc, reloc_call, reloc_jrcxz,
 * reloc_loop); quit -> bye.
 */
#include <string.h>

#include "proto.h"

int reloc_fn(int n);
int reloc_rip(int n);
int reloc_rip_imm(int n);
int reloc_jcc(int n);
int reloc_call(int n);
int reloc_jrcxz(int n);
int reloc_loop(int n);

static const struct {
    const char *name;
    int (*fn)(int);
} fns[] = {
    {"call", reloc_fn},
    {"reloc_fn", reloc_fn},
    {"reloc_rip", reloc_rip},
    {"reloc_rip_imm", reloc_rip_imm},
    {"reloc_jcc", reloc_jcc},
    {"reloc_call", reloc_call},
    {"reloc_jrcxz", reloc_jrcxz},
    {"reloc_loop", reloc_loop},
};

int main(void)
{
    char line[PROTO_LINE_MAX];
    long n;

    proto_init();
    proto_ready();
    while (proto_next(line, sizeof line)) {
        size_t i;
        for (i = 0; i < sizeof fns / sizeof fns[0]; i++) {
            if (proto_arg_int(line, fns[i].name, &n)) {
                proto_reply("%d", fns[i].fn((int)n));
                break;
            }
        }
        if (i < sizeof fns / sizeof fns[0])
            continue;
        if (proto_is(line, "quit")) {
            proto_reply("bye");
            return 0;
        }
        proto_unknown(line);
    }
    return 0;
}
