/* Worker threads that call a patched function in a tight loop and classify
 * every result as old (unpatched), new (old + delta) or bad (anything else).
 * Shared by threads.c and spinner.c; holds no patched code.
 *
 * Commands handled by workers_command():
 *   stats   -> "calls <n> old <n> new <n> bad <n>" (+ " last_bad f(<x>)=<r>" if bad)
 *   sync    -> "synced" once every running worker has made two more calls, so
 *              every call counted after "sync" started after the command;
 *              "sync timeout" after 20 s
 *   park    -> "parked <n>" once every worker sleeps in FUTEX_WAIT
 *              (outside the patched function); "park timeout" after 20 s
 *   unpark  -> "unparked"
 *   tids    -> "tids <n>": threads in the process, main thread included
 *   call N  -> the patched function's result on N, called by the main thread
 */
#ifndef MICROPATCH_TARGET_WORKERS_H
#define MICROPATCH_TARGET_WORKERS_H

struct workers_config {
    long count;             /* number of worker threads */
    int (*fn)(int);         /* the patched function */
    int (*expected)(int);   /* its unpatched result */
    int delta;              /* a patched result is expected(x) + delta */
    int start_parked;       /* park the workers after their first call */
    int work;               /* LCG steps between calls: time spent outside fn */
};

/* Start the workers; returns once each has made its first call. */
void workers_start(const struct workers_config *config);

/* Handle one command; returns 0 if the line is not a workers command. */
int workers_command(const char *line);

/* Stop and join every worker. */
void workers_stop(void);

#endif
