/* Line protocol shared by every test target.
 *
 * On start a target prints "ready <pid>", then answers each command line read
 * from stdin with exactly one line, flushed.  "quit" answers "bye" and exits 0;
 * EOF on stdin exits 0.  Unknown commands answer "error ...".
 *
 * proto.c is its own translation unit and holds no patched code.
 */
#ifndef MICROPATCH_TARGET_PROTO_H
#define MICROPATCH_TARGET_PROTO_H

#include <stddef.h>

#define PROTO_LINE_MAX 4096

/* Static stdio buffers (no malloc after this), and let any process ptrace us
 * even under Yama ptrace_scope=1 (tests may run the CLI as a sibling). */
void proto_init(void);

/* Print "ready <pid>". */
void proto_ready(void);

/* Read one command line, newline stripped.  Returns 0 on EOF. */
int proto_next(char *line, size_t size);

/* Print one answer line (a newline is appended) and flush. */
void proto_reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* If line is "<word> <int>", store the int and return 1. */
int proto_arg_int(const char *line, const char *word, long *value);

/* If line is "<word>" exactly, return 1. */
int proto_is(const char *line, const char *word);

/* Answer "error unknown command: <line>". */
void proto_unknown(const char *line);

/* Raw thread id. */
int proto_gettid(void);

/* Number of threads in this process (/proc/self/task entries). */
int proto_thread_count(void);

/* First field of /proc/self/task/<tid>/syscall: the syscall number the thread
 * is blocked in, -1 if running, -2 if unreadable. */
long proto_thread_syscall(int tid);

/* Wait (polling, bounded) until thread tid is blocked in syscall nr.
 * Returns 1 on success, 0 on timeout. */
int proto_wait_blocked(int tid, long nr);

#endif
