/*
 * sidusd.net._lockstep, a run's payloads.  A run made from `data` carries them; a *file run*
 * (Run(..., fd=, offset=, size=)) reads them itself, RUN_READ_BYTES at a time (whole steps), with pread(2)
 * (the GIL released) into a buffer of its own, as its steps need them: a whole kernel or
 * initrd is one run, with no trip through Python to read the next part of it.  A read that
 * fails or comes short (the file shrank) stops the run before the step that needed it: the
 * ACK goes back to Python, whose own read meets the error and ends the transfer.
 */
#include "_lockstep.h"
#include <errno.h>
#include <unistd.h>

static inline Py_ssize_t
run_total(const RunObject *run)
{
    return run->fd >= 0 ? run->size : PyBytes_GET_SIZE(run->data);
}

/* Run bytes [off, off + take): block `i` of the next step (i < run_step_blocks), or with `i`
 * -1 all the step's blocks. */
static inline void
next_range(const RunObject *run, Py_ssize_t i, Py_ssize_t *off, Py_ssize_t *take)
{
    Py_ssize_t total = run_total(run), n = i < 0 ? run_step_blocks(run) : 1;
    *off = (run->used + (i < 0 ? 0 : i)) * run->blksize;
    *take = total - *off < n * run->blksize ? total - *off : n * run->blksize;
    if (*take < 0)
        *take = 0;
}

int
run_next_ready(const RunObject *run)
{
    if (run->fd < 0)
        return 1;
    Py_ssize_t off, take;
    next_range(run, -1, &off, &take);
    return take == 0 || (off >= run->buf_from && off + take <= run->buf_from + run->buf_len);
}

int
run_read_next(RunObject *run)
{
    Py_ssize_t off, take;
    next_range(run, -1, &off, &take);      /* buf_cap holds whole steps: the step fits */
    Py_ssize_t want = run->size - off < run->buf_cap ? run->size - off : run->buf_cap;
    if (run->buf == NULL) {
        run->buf = PyMem_Malloc((size_t)run->buf_cap);
        if (run->buf == NULL) {
            run->read_errno = ENOMEM;
            return -1;
        }
    }
    run->buf_len = 0;                  /* nothing valid while it is overwritten */
    Py_ssize_t got = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (got < want) {
        ssize_t n = pread(run->fd, run->buf + got, (size_t)(want - got), run->offset + off + got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : EIO;     /* 0: the file ended early (it shrank) */
            break;
        }
        got += n;
    }
    Py_END_ALLOW_THREADS
    run->reads++;
    if (err) {
        run->read_errno = err;
        return -1;
    }
    run->buf_from = off;
    run->buf_len = got;
    return 0;
}

void
run_next_payload(const RunObject *run, Py_ssize_t i, const char **p, size_t *len)
{
    Py_ssize_t off, take;
    next_range(run, i, &off, &take);
    *len = (size_t)take;
    if (run->fd < 0)
        *p = PyBytes_AS_STRING(run->data) + off;
    else
        *p = take ? (const char *)run->buf + (off - run->buf_from) : (const char *)run->buf;
}
