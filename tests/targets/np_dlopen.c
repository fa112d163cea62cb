/* np_dlopen LIBRARY [N]: dlopen the library and call its copy_packet(.., N)
 * right after dlopen returns (the exploit input, default 65); prints the
 * result and what its constructor got: "-1 -1" if the library was patched
 * before dlopen returned, "-2 -2" if not.  Waits for a line on stdin first
 * when given a third argument (so a test can start it before the load). */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

static char source[4096];

int main(int argc, char **argv)
{
    char line[16];
    if (argc < 2)
        return 2;
    if (argc > 3 && !fgets(line, sizeof line, stdin))
        return 3;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    int (*copy)(const char *, int) = (int (*)(const char *, int))dlsym(lib, "copy_packet");
    int *ctor = (int *)dlsym(lib, "np_ctor_result");
    if (!copy || !ctor)
        return 1;
    printf("%d %d\n", copy(source, argc > 2 ? atoi(argv[2]) : 65), *ctor);
    return 0;
}
