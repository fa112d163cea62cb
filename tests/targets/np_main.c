/* np_main: the new-process target (tests/integration/test_newproc.py, benchmarks/agent_exec.py).
 *
 * The exploit input is the first thing main does: copy_packet(source, N) with
 * N = argv[1] (default 65), printed on one line: -2 unpatched ("would have
 * overflowed"), -1 with the fix (the patched bounds check).  Built as np_exe
 * (copy_packet from vuln_fn.c in the executable) and as np_lib_main (copy_packet
 * in libnpvuln.so, a DT_NEEDED library found through rpath $ORIGIN), which then
 * also prints what the library's constructor got from copy_packet(.., 65).
 * With a second argument it first waits for a line on stdin (a test patches it
 * meanwhile: the late paths).
 */
#include <stdio.h>
#include <stdlib.h>

#include "vuln.h"

#ifdef NP_LIBRARY
extern int np_ctor_result;
#endif

static char source[4096];

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 65;
    char line[16];
    if (argc > 2 && !fgets(line, sizeof line, stdin))
        return 3;
    int got = copy_packet(source, n);
#ifdef NP_LIBRARY
    printf("%d %d\n", got, np_ctor_result);
#else
    printf("%d\n", got);
#endif
    return 0;
}
