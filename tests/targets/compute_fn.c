/* The patched function of threads; see threads.c for the documentation. */
__attribute__((noinline, noclone, used, visibility("default")))
int compute(int x)
{
    return x * 2 + 1;
}
