/* First patched function of twofuncs; see twofuncs.c for the documentation. */
__attribute__((noinline, noclone, used, visibility("default")))
int check_a(int x)
{
    return x + 1000;
}
