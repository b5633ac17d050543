/*
 * sidusd.net._lockstep, the Engine: Engine.pump() reads a transfer socket with recvmmsg(2),
 * takes the steps of the runs whose ACK arrives exactly as expected and sends their DATA with
 * sendmmsg(2) straight from the run's buffer (_lockstep.c says what a run is and why).
 */
#include "_lockstep.h"
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    unsigned int capacity, tx_capacity;
    size_t bufsize;
    struct mmsghdr *rmsgs;
    struct iovec *riov;
    struct sockaddr_in *rnames;
    unsigned char *rdata;
    struct send_batch sb;        /* _sendbatch.c: the DATA of a round's steps */
    struct spin_policy spin;     /* _wait.c: how its waits for an ACK went */
    Py_ssize_t recv_calls;       /* recvmmsg calls made, those that found nothing included */
} EngineObject;

static void
Engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(self->rmsgs);
    PyMem_Free(self->riov);
    PyMem_Free(self->rnames);
    PyMem_Free(self->rdata);
    sb_free(&self->sb);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "bufsize", "tx_capacity", NULL};
    unsigned int capacity = 64, tx_capacity = 256;
    Py_ssize_t bufsize = 2048;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|InI", kwlist, &capacity, &bufsize, &tx_capacity))
        return NULL;
    if (capacity < 1 || capacity > MAX_VLEN || tx_capacity < 1 || tx_capacity > MAX_VLEN
        || bufsize < 16 || bufsize > 65536) {
        PyErr_SetString(PyExc_ValueError, "Engine: capacity and tx_capacity 1..1024, bufsize 16..65536");
        return NULL;
    }
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->capacity = capacity;
    self->tx_capacity = tx_capacity;
    self->bufsize = (size_t)bufsize;
    self->rmsgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->riov = PyMem_Calloc(capacity, sizeof(struct iovec));
    self->rnames = PyMem_Calloc(capacity, sizeof(struct sockaddr_in));
    self->rdata = PyMem_Malloc((size_t)capacity * (size_t)bufsize);
    int sb_bad = sb_init(&self->sb, tx_capacity);
    if (!self->rmsgs || !self->riov || !self->rnames || !self->rdata || sb_bad < 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (unsigned int i = 0; i < capacity; i++) {
        self->riov[i].iov_base = self->rdata + (size_t)i * (size_t)bufsize;
        self->riov[i].iov_len = (size_t)bufsize;
        self->rmsgs[i].msg_hdr.msg_iov = &self->riov[i];
        self->rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    return (PyObject *)self;
}

static inline int
engine_recv(EngineObject *self, int fd)
{
    self->recv_calls++;
    return recvmmsg(fd, self->rmsgs, self->capacity, MSG_DONTWAIT, NULL);
}

/* Whether datagram d (len bytes, not truncated) is the ACK `run` waits for. */
static inline int
takes_step(const RunObject *run, const unsigned char *d, size_t len)
{
    return !run->stopped && len == 4 && d[0] == 0 && d[1] == 4
           && (((unsigned int)d[2] << 8) | d[3]) == run->ack && run->used < run->count;
}

PyDoc_STRVAR(pump_doc,
"pump(fd, runs, now, rounds, sending, wait_us=0, spin_us=0, wake_fd=-1, gso=1) -> PumpResult\n\n"
"Up to `rounds` recvmmsg calls on the non-blocking UDP socket `fd`.  A datagram that is\n"
"exactly the 4-byte ACK a Run in `runs` (dict: 6-byte peer key -> Run) waits for takes\n"
"that run's next step: its DATA (the run's window of blocks) is sent (sendmmsg, once per\n"
"round) or, if `sending` is false or the kernel refuses it for now, returned in `unsent`\n"
"as (bytes, run.peer), or (tuple of bytes, run.peer) for a GSO message.\n"
"`gso` > 1: the blocks of a step go as GSO messages (UDP_SEGMENT) of up to `gso`\n"
"segments; if the kernel refuses one, it and the rest are in `unsent`, `gso_refused`.\n"
"Every other datagram is returned in `rest` as (payload, key, truncated), in order, and\n"
"stops its peer's run; one from a sender that is not IPv4 is dropped and counted.\n"
"`wait_us`: when a round took steps, nothing else came and the socket is empty, wait up to\n"
"that long (in all, per call; GIL released) for the ACK of what was just sent instead of\n"
"returning: a lockstep peer that answers at once costs no trip through the event loop.\n"
"`spin_us`: of each such wait, poll without sleeping for up to that long first.\n"
"`wake_fd`: a descriptor whose readability ends the wait and every later one of this\n"
"call (the event loop's epoll descriptor: it has other work), -1 for none.\n"
"PumpResult(rest, unsent, rx, calls, send_errors, blocked, rx_errno; dropped, gso_refused).");

static PyObject *
Engine_pump(EngineObject *self, PyObject *args)
{
    int fd, rounds, sending;
    long wait_us = 0, spin_us = 0;
    int wake_fd = -1, woken = 0, gso = 1, gso_refused = 0;
    PyObject *runs;
    double now;
    if (!PyArg_ParseTuple(args, "iO!dip|llii", &fd, &PyDict_Type, &runs, &now, &rounds, &sending,
                          &wait_us, &spin_us, &wake_fd, &gso))
        return NULL;
    if (wait_us < 0 || wait_us > 100000 || spin_us < 0 || spin_us > 1000 || gso < 1
        || gso > GSO_MAX_SEGS) {
        PyErr_SetString(PyExc_ValueError,
                        "pump: 0 <= wait_us <= 100000, 0 <= spin_us <= 1000, 1 <= gso <= 64");
        return NULL;
    }
    lockstep_state *st = PyType_GetModuleState(Py_TYPE(self));
    if (st == NULL)
        return NULL;
    Py_ssize_t rx = 0, calls = 0, errors = 0, dropped = 0;
    int blocked = 0, rx_errno = 0;
    const size_t bs = self->bufsize;
    struct send_batch *sb = &self->sb;  /* filled, not yet sent: empty between calls */
    int stepped_only = 0;               /* the last round took steps and returned nothing */
    int last_n = 0;                     /* datagrams the last round read */
    struct timespec t0 = {0, 0}, t_round = {0, 0};   /* the call's start; this round's */
    clock_gettime(CLOCK_MONOTONIC, &t0);      /* a step's time: `now` plus the time since */
    PyObject *rest = PyList_New(0), *unsent = PyList_New(0);
    if (rest == NULL || unsent == NULL)
        goto fail;

    for (int r = 0; r < rounds && !blocked; r++) {
        for (unsigned int i = 0; i < self->capacity; i++) {
            struct msghdr *h = &self->rmsgs[i].msg_hdr;
            h->msg_name = &self->rnames[i];
            h->msg_namelen = sizeof(struct sockaddr_in);
            h->msg_control = NULL;
            h->msg_controllen = 0;
            h->msg_flags = 0;
        }
        /* After a round that read one ACK and took its step, the next ACK is a round trip away:
         * wait for it at once, without a recvmmsg that finds nothing (a system call per block
         * saved, for a lone lockstep peer); after a bigger round, look first. */
        int wait_first = stepped_only && last_n == 1 && wait_us > 0 && !woken;
        int n = -1;
        errno = EAGAIN;
        if (!wait_first)
            n = engine_recv(self, fd);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && stepped_only && wait_us > 0
            && !woken) {
            long spent = us_since(&t0);
            stepped_only = 0;
            int w = spent < wait_us ? wait_readable(&self->spin, fd, wake_fd, &t_round, wait_us - spent,
                                                    spin_us) : 0;
            woken = w == WAIT_WOKEN;        /* the event loop has other work: no more waits */
            if (w == 1)
                n = engine_recv(self, fd);
            else
                errno = EAGAIN;              /* time up or woken: this call ends here */
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                rx_errno = errno;
            break;
        }
        if (n == 0)
            break;
        calls++;
        last_n = n;
        /* the round's time: its steps' (one call may last many) and its DATA's send, from
         * which the peer's turnaround is timed */
        clock_gettime(CLOCK_MONOTONIC, &t_round);
        double at = now + (double)us_between(&t0, &t_round) / 1e6;
        rx += n;
        for (int i = 0; i < n; i++) {
            const unsigned char *d = self->rdata + (size_t)i * bs;
            size_t len = self->rmsgs[i].msg_len;
            int trunc = (self->rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC) || len > bs;
            if (!is_inet_peer(&self->rnames[i], self->rmsgs[i].msg_hdr.msg_namelen)) {
                dropped++;
                continue;
            }
            PyObject *key = peer_key_bytes(&self->rnames[i]);
            if (key == NULL)
                goto fail;
            /* a strong reference: sending a full batch below may run Python code (GC) */
            PyObject *found = Py_XNewRef(PyDict_GetItemWithError(runs, key));
            if (found == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                goto fail;
            }
            if (found != NULL && Py_IS_TYPE(found, st->run_type)) {
                RunObject *run = (RunObject *)found;
                int step = !trunc && takes_step(run, d, len);
                int fits = step && sb_fits(sb, run);
                if (step && !fits && sb->nb == 0)
                    step = 0;                    /* a step bigger than a batch: Python's */
                int ready = step && run_next_ready(run);
                if (step && (!fits || (!ready && sb_holds(sb, run)))) {
                    /* a full batch, or a file run about to read into the buffer its unsent
                     * DATA point into (rare: once per read): send the batch first */
                    int rc = sb_send(sb, fd, sending && !blocked, unsent, &errors, &blocked,
                                     &gso_refused);
                    if (rc < 0) {
                        Py_DECREF(found);
                        Py_DECREF(key);
                        goto fail;
                    }
                }
                if (step && !ready && run_read_next(run) < 0)
                    step = 0;                    /* a read failed: the ACK goes back to Python */
                if (step) {
                    sb_add_step(sb, run, &self->rnames[i], at, gso);
                    Py_DECREF(found);
                    Py_DECREF(key);
                    continue;
                }
                run->stopped = 1;
            }
            Py_XDECREF(found);
            PyObject *payload = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)(len > bs ? bs : len));
            PyObject *item = payload ? PyTuple_Pack(3, payload, key, trunc ? Py_True : Py_False) : NULL;
            Py_XDECREF(payload);
            Py_DECREF(key);
            if (item == NULL || PyList_Append(rest, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
        stepped_only = sb->k > 0 && PyList_GET_SIZE(rest) == 0 && PyList_GET_SIZE(unsent) == 0;
        int rc = sb_send(sb, fd, sending && !blocked, unsent, &errors, &blocked, &gso_refused);
        if (rc < 0)
            goto fail;
        stepped_only = stepped_only && !blocked && PyList_GET_SIZE(unsent) == 0;
    }
    PyObject *res = PyStructSequence_New(st->pump_result_type);
    if (res == NULL)
        goto fail;
    PyObject *fields[] = {rest, unsent, PyLong_FromSsize_t(rx), PyLong_FromSsize_t(calls),
                          PyLong_FromSsize_t(errors), PyLong_FromLong(blocked),
                          PyLong_FromLong(rx_errno), PyLong_FromSsize_t(dropped),
                          PyBool_FromLong(gso_refused)};
    int bad = 0;
    for (int f = 0; f < 9; f++) {
        bad |= fields[f] == NULL;
        PyStructSequence_SET_ITEM(res, f, fields[f]);   /* steals; NULL stays NULL */
    }
    if (bad) {
        Py_DECREF(res);
        return NULL;
    }
    return res;

fail:
    sb_send(sb, fd, 0, NULL, &errors, &blocked, &gso_refused);   /* release the batch, unsent */
    Py_XDECREF(rest);
    Py_XDECREF(unsent);
    return NULL;
}

static PyMethodDef Engine_methods[] = {
    {"pump", (PyCFunction)Engine_pump, METH_VARARGS, pump_doc},
    {NULL}
};

static PyMemberDef Engine_members[] = {
    {"waits", T_PYSSIZET, offsetof(EngineObject, spin.waits), READONLY, "waits for an ACK so far"},
    {"spun", T_PYSSIZET, offsetof(EngineObject, spin.spun), READONLY, "... of which spun first"},
    {"woken", T_PYSSIZET, offsetof(EngineObject, spin.woken), READONLY,
     "... of which wake_fd ended"},
    {"recv_calls", T_PYSSIZET, offsetof(EngineObject, recv_calls), READONLY,
     "recvmmsg calls made (those that found nothing included)"},
    {NULL}
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_members, Engine_members},
    {Py_tp_doc, "Engine(capacity=64, bufsize=2048, tx_capacity=256): recvmmsg/sendmmsg buffers."},
    {Py_tp_new, Engine_new},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_methods, Engine_methods},
    {0, NULL}
};

PyType_Spec Engine_spec = {
    .name = "sidusd.net._lockstep.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Engine_slots,
};

