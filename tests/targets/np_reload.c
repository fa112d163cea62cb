/* np_reload LIBRARY: dlopen, call copy_packet(.., 65), dlclose, three times; one
 * line each.  The library is unmapped by dlclose and mapped again, usually at
 * the same address: each load must be patched anew ("-1" three times). */
#include <dlfcn.h>
#include <stdio.h>

static char source[4096];

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    for (int i = 0; i < 3; i++) {
        void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
        if (!lib)
            return 1;
        int (*copy)(const char *, int) = (int (*)(const char *, int))dlsym(lib, "copy_packet");
        if (!copy)
            return 1;
        printf("%d\n", copy(source, 65));
        fflush(stdout);
        dlclose(lib);
    }
    return 0;
}
