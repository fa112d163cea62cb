/* The patched function of vuln / vuln_lib; see vuln.c for the documentation. */
#include <string.h>

#include "vuln.h"

static char packet_buf[PACKET_BUF_SIZE];

__attribute__((noinline, noclone, used, visibility("default")))
int copy_packet(const char *buf, int len)
{
    if (len < 0)
        return -1; /* the existing error path a fix can jump to */
    /* The bug: no "len > PACKET_BUF_SIZE" check.  The target reports the
     * overflow it would have caused instead of corrupting its memory. */
    if (len > PACKET_BUF_SIZE)
        return -2;
    memcpy(packet_buf, buf, (size_t)len);
    return len;
}
