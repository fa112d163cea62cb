/* An embedding program (as uwsgi or a plugin host embeds libpython): it maps
 * libpython from its start, but initializes Python only once a line arrives on
 * stdin; then it runs the script named by argv[1] with the other arguments. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char line[64];
    if (argc < 2)
        return 2;
    printf("waiting %d\n", (int)getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    Py_Initialize();
    PyObject *args = PyList_New(0);
    for (int i = 1; i < argc; i++) {
        PyObject *arg = PyUnicode_DecodeFSDefault(argv[i]);
        PyList_Append(args, arg);
        Py_DECREF(arg);
    }
    PySys_SetObject("argv", args);
    Py_DECREF(args);
    FILE *script = fopen(argv[1], "r");
    if (!script)
        return 3;
    int failed = PyRun_SimpleFileEx(script, argv[1], 1);
    return Py_FinalizeEx() < 0 || failed ? 1 : 0;
}
