/* A C loop for the CPython tests: spins for `seconds` without calling anything
 * (ctypes.CDLL calls it without the GIL, ctypes.PyDLL with it). */
#include <time.h>

void spin(double seconds) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
}
