/* Second patched function of twofuncs; see twofuncs.c for the documentation. */
__attribute__((noinline, noclone, used, visibility("default")))
int check_b(int x)
{
    return x * 7 - 3;
}
