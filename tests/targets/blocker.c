/* blocker: a thread blocked in read(2) while the process is patched.
 *
 * Patched function: copy_packet, the same vuln_fn.c as vuln (see vuln.c for
 * its instructions, sites and fix; PIE offsets apply).
 *
 * A reader thread sits in libc read(2) on a pipe (the main thread sits in
 * read(2) on stdin).  "ready" comes once the reader is blocked in read:
 * /proc/self/task/<tid>/syscall starts with "0".
 *
 * Commands:
 *   call N     ->  copy_packet(source, N), as vuln
 *   feed TEXT  ->  the main thread writes "TEXT\n" to the pipe; the reader
 *                  thread's read returns it and the reader answers
 *                  "read TEXT" (the main thread waits for that answer)
 *   state      ->  "reader <tid> syscall <nr>": nr 0 = blocked in read
 *                  (waits up to 10 s for the reader to block again first)
 *   quit       ->  closes the pipe, joins the reader, "bye"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "proto.h"
#include "vuln.h"

static char source[4096];
static int feed_pipe[2];
static sem_t answered;
static volatile int reader_tid;

/* Reads lines from the pipe with libc read(2) and answers "read <TEXT>". */
static void *reader(void *arg)
{
    char text[PROTO_LINE_MAX];
    size_t len = 0;
    (void)arg;

    reader_tid = proto_gettid();
    for (;;) {
        char c;
        ssize_t n = read(feed_pipe[0], &c, 1);
        if (n <= 0)
            return NULL;
        if (c != '\n') {
            if (len < sizeof text - 1)
                text[len++] = c;
            continue;
        }
        text[len] = '\0';
        len = 0;
        proto_reply("read %s", text);
        sem_post(&answered);
    }
}

int main(void)
{
    char line[PROTO_LINE_MAX];
    pthread_t thread;
    long n;

    proto_init();
    for (size_t i = 0; i < sizeof source; i++)
        source[i] = (char)(i * 7 + 1);
    if (pipe(feed_pipe) || sem_init(&answered, 0, 0) ||
        pthread_create(&thread, NULL, reader, NULL)) {
        perror("setup");
        return 1;
    }
    while (!reader_tid)
        usleep(100);
    if (!proto_wait_blocked(reader_tid, 0)) {
        fprintf(stderr, "reader thread %d never blocked in read\n", reader_tid);
        return 1;
    }
    proto_ready();
    while (proto_next(line, sizeof line)) {
        if (proto_arg_int(line, "call", &n))
            proto_reply("%d", copy_packet(source, (int)n));
        else if (strncmp(line, "feed ", 5) == 0) {
            size_t len = strlen(line);
            line[len] = '\n'; /* one write(2) of at most PIPE_BUF bytes is atomic */
            if (write(feed_pipe[1], line + 5, len - 4) != (ssize_t)(len - 4))
                proto_reply("error write failed");
            else
                sem_wait(&answered); /* the reader answers; keep answers in order */
        } else if (proto_is(line, "state")) {
            /* After an answer the reader goes back to read(2); wait for it. */
            proto_wait_blocked(reader_tid, 0);
            proto_reply("reader %d syscall %ld", reader_tid, proto_thread_syscall(reader_tid));
        } else if (proto_is(line, "quit")) {
            close(feed_pipe[1]);
            pthread_join(thread, NULL);
            proto_reply("bye");
            return 0;
        } else
            proto_unknown(line);
    }
    return 0;
}
