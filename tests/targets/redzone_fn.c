/* The patched function of redzone; see redzone.c for the documentation. */
__attribute__((noinline, noclone, used, visibility("default")))
long rz_sum(long n)
{
    /* 14 longs (112 bytes, at [rsp-0x78, rsp-0x8)): the largest array gcc 12
     * keeps in the red zone without "sub rsp".  volatile keeps every store and
     * load; written out so that the code is straight-line (no branch targets). */
    volatile long a[14];
    long s;

    a[0] = n + 0;   a[1] = n + 1;   a[2] = n + 2;   a[3] = n + 3;
    a[4] = n + 4;   a[5] = n + 5;   a[6] = n + 6;   a[7] = n + 7;
    a[8] = n + 8;   a[9] = n + 9;   a[10] = n + 10; a[11] = n + 11;
    a[12] = n + 12; a[13] = n + 13;
    s = a[0];
    s += a[1];  s += a[2];  s += a[3];  s += a[4];
    s += a[5];  s += a[6];  s += a[7];  s += a[8];
    s += a[9];  s += a[10]; s += a[11]; s += a[12];
    s += a[13];
    return s;
}
