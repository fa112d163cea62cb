/* libnpvuln.so's constructor: copy_packet(.., 65) runs before main or before
 * dlopen returns; a library patched before its initialisers run makes it -1. */
#include "vuln.h"

static char ctor_source[128];
__attribute__((visibility("default"))) int np_ctor_result = 0;

__attribute__((constructor)) static void np_ctor(void)
{
    np_ctor_result = copy_packet(ctor_source, 65);
}
