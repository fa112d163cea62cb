/* Target of the `explore` tests (tests/unit/tools): never run, only read.
 *
 * Built PIE and non-PIE, each with and without its symbols (strip), so the
 * tests see functions named by .symtab, by .dynsym (the exported ones) and by
 * nothing but their .eh_frame FDE.
 *
 * - check_header: a bounds check against the constant 0x5a17 and the string
 *   "bad header magic" (xref by string and constant).
 * - log_line: calls the imports puts and strlen (callees through the PLT).
 * - dispatch: calls check_header and log_line (callers, callees by name).
 * - summarise: exported (default visibility), keeps its name in .dynsym once
 *   stripped, and references "summary: %d items".
 * - branchy_loop: a loop whose back edge targets an instruction a few bytes
 *   into the function (site starts just before it are refused).
 */
#include <stdio.h>
#include <string.h>

#define HEADER_MAGIC 0x5a17

int explore_sink;

__attribute__((noinline, noclone)) static int check_header(const unsigned char *p, int len)
{
    if (len < 4)
        return -1;
    if ((p[0] | (p[1] << 8)) != HEADER_MAGIC) {
        fputs("bad header magic\n", stderr);
        return -2;
    }
    return p[2];
}

__attribute__((noinline, noclone)) static void log_line(const char *text)
{
    explore_sink += (int)strlen(text);
    puts(text);
}

__attribute__((noinline, noclone)) static int dispatch(const unsigned char *p, int len)
{
    int kind = check_header(p, len);
    if (kind < 0) {
        log_line("dispatch: rejected");
        return kind;
    }
    log_line("dispatch: accepted");
    return kind * 3;
}

__attribute__((noinline, noclone, visibility("default"))) int summarise(int items)
{
    printf("summary: %d items\n", items);
    return items;
}

__attribute__((noinline, noclone)) static int branchy_loop(const int *v, int n)
{
    int total = 0;
    for (int i = 0; i < n; i++)
        total += v[i] > 7 ? v[i] : 1;
    return total;
}

int main(int argc, char **argv)
{
    int values[4] = {argc, 8, 9, 10};
    int kind = dispatch((const unsigned char *)argv[0], argc * 4);
    return summarise(kind + branchy_loop(values, argc));
}
