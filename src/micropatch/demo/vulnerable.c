/* The micropatch demo target: a toy login service with a classic bug.
 *
 * set_name() copies a client-supplied name into a 16-byte field without
 * checking its length, so 17 bytes overwrite the is_admin flag that follows.
 * The upstream fix would add `if (len > sizeof s->name) return -1;`; the demo
 * micropatch adds exactly that check, live, at the entry of set_name().
 *
 * Protocol (one line in, one line out): `name HEX` sets the name from
 * hex-encoded bytes, `whoami` reports, `quit` exits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct session {
    char name[16];
    int is_admin;
};

static struct session session;

__attribute__((noinline)) int set_name(struct session *s, const char *src, unsigned len)
{
    memcpy(s->name, src, len); /* BUG: no bound on len */
    return (int)len;
}

static int unhex(const char *hex, char *out, int max)
{
    int n = 0;
    while (hex[0] && hex[1] && n < max) {
        unsigned byte;
        if (sscanf(hex, "%2x", &byte) != 1)
            break;
        out[n++] = (char)byte;
        hex += 2;
    }
    return n;
}

int main(void)
{
    char line[512], buf[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "name ", 5) == 0) {
            memset(&session, 0, sizeof session);
            int n = unhex(line + 5, buf, sizeof buf);
            int r = set_name(&session, buf, (unsigned)n);
            if (r < 0)
                printf("rejected: name too long (%d bytes)\n", n);
            else
                printf("hello %.16s, admin: %s\n", session.name, session.is_admin ? "YES" : "no");
        } else if (strcmp(line, "quit") == 0) {
            break;
        } else {
            printf("unknown command\n");
        }
    }
    return 0;
}
