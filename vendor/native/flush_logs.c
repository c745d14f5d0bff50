/*
 * Preloaded into every llama.cpp tool that tbpw runs (LD_PRELOAD).
 *
 * llama.cpp's common log writes from a worker thread that is never joined when a tool exits
 * (the logger is leaked on purpose, upstream issue 22142), so the last lines of a run -- the
 * final perplexity, the KL-divergence summary, the task scores -- are now and then lost.
 * At exit this joins that thread, which first writes everything still queued.
 *
 * The functions are looked up at run time, so one build of this file serves every llama.cpp
 * build, and a tool that does not use the common log is left alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

typedef void *(*log_main_fn)(void);
typedef void (*log_pause_fn)(void *);

static void tbpw_flush_common_log(void) {
    log_main_fn log_main = (log_main_fn) dlsym(RTLD_DEFAULT, "_Z15common_log_mainv");
    log_pause_fn log_pause = (log_pause_fn) dlsym(RTLD_DEFAULT, "_Z16common_log_pauseP10common_log");
    if (log_main != NULL && log_pause != NULL) {
        log_pause(log_main());
    }
}

__attribute__((constructor)) static void tbpw_register_flush(void) {
    atexit(tbpw_flush_common_log);
}
