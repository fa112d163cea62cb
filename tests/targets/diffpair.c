/* Target of the `diff` tests (tests/unit/tools): built twice from this file,
 * without and with -DFIXED, at -O0 and -O2, then stripped.
 *
 * Seven record parsers of the same shape. The fix is one bounds check in
 * parse_name (the vulnerable build copies `len` bytes into a 32-byte field
 * without checking it), the usual shape of a security fix: the tests expect
 * `micropatch diff OLD NEW` to rank parse_name first. The fixed build also
 * changes constants only, as releases do (a version string, a key): those
 * changes of operands must rank after the change of logic.
 */
#include <stdio.h>
#include <string.h>

struct record {
    int kind;
    int flags;
    char name[32];
    char value[64];
    char note[48];
    unsigned char tag[16];
};

#define PARSER __attribute__((noinline, noclone))

#ifdef FIXED
#define RELEASE "1.0.1"
#define TAG_KEY 0x5d
#else
#define RELEASE "1.0.0"
#define TAG_KEY 0x5c
#endif

PARSER static int parse_kind(struct record *r, const unsigned char *p, int len)
{
    if (len < 2)
        return -1;
    r->kind = p[0] | (p[1] << 8);
    if (r->kind > 900)
        return -2;
    return 2;
}

PARSER static int parse_flags(struct record *r, const unsigned char *p, int len)
{
    if (len < 4)
        return -1;
    r->flags = p[0] | (p[1] << 8) | (p[2] << 16);
    if (r->flags & 0x800000)
        fputs("flags: reserved bit set\n", stderr);
    return 4;
}

PARSER static int parse_name(struct record *r, const unsigned char *p, int len)
{
    if (len < 1)
        return -1;
    int n = p[0];
#ifdef FIXED
    if (n >= (int)sizeof(r->name))
        return -3;
#endif
    if (n + 1 > len)
        return -1;
    memcpy(r->name, p + 1, (size_t)n);
    r->name[n] = 0;
    return n + 1;
}

PARSER static int parse_value(struct record *r, const unsigned char *p, int len)
{
    if (len < 1)
        return -1;
    int n = p[0];
    if (n >= (int)sizeof(r->value))
        return -3;
    if (n + 1 > len)
        return -1;
    memcpy(r->value, p + 1, (size_t)n);
    r->value[n] = 0;
    return n + 1;
}

PARSER static int parse_note(struct record *r, const unsigned char *p, int len)
{
    if (len < 2)
        return -1;
    int n = p[0] | (p[1] << 8);
    if (n >= (int)sizeof(r->note))
        return -3;
    if (n + 2 > len)
        return -1;
    memcpy(r->note, p + 2, (size_t)n);
    r->note[n] = 0;
    return n + 2;
}

PARSER static int parse_tag(struct record *r, const unsigned char *p, int len)
{
    if (len < 16)
        return -1;
    for (int i = 0; i < 16; i++)
        r->tag[i] = (unsigned char)(p[i] ^ TAG_KEY);
    return 16;
}

PARSER static void report(const struct record *r)
{
    printf("record " RELEASE " kind=%d flags=%x name=%s value=%s note=%s\n", r->kind, r->flags,
           r->name, r->value, r->note);
}

int main(int argc, char **argv)
{
    static const unsigned char input[] = {
        3, 0, 1, 2, 3, 0, 4, 'n', 'a', 'm', 'e', 2, 'v', 'l', 1, 0, 'x', 1, 2, 3, 4, 5, 6, 7,
        8, 9, 10, 11, 12, 13, 14, 15, 16,
    };
    struct record r = {0};
    const unsigned char *p = input;
    int len = (int)sizeof input - (argc > 1 ? (int)strlen(argv[1]) : 0);
    int (*const parsers[])(struct record *, const unsigned char *, int) = {
        parse_kind, parse_flags, parse_name, parse_value, parse_note, parse_tag,
    };
    for (unsigned i = 0; i < sizeof parsers / sizeof parsers[0]; i++) {
        int used = parsers[i](&r, p, len);
        if (used < 0) {
            fprintf(stderr, "parser %u failed: %d\n", i, used);
            return 1;
        }
        p += used;
        len -= used;
    }
    report(&r);
    return 0;
}
