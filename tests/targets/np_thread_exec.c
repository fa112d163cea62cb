/* np_thread_exec PROGRAM: a thread other than the main one execs PROGRAM (the
 * exec'ing thread takes the process's id; the kernel reports the exec event
 * under that id). */
#include <pthread.h>
#include <unistd.h>

static char *program;

static void *run(void *unused)
{
    (void)unused;
    execl(program, program, (char *)0);
    return 0;
}

int main(int argc, char **argv)
{
    pthread_t thread;
    if (argc < 2)
        return 2;
    program = argv[1];
    pthread_create(&thread, 0, run, 0);
    pthread_join(thread, 0);
    return 1;
}
