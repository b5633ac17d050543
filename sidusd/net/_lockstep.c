/*
 * sidusd.net._lockstep: the lockstep TFTP steps carried out in C (optional accelerator).
 *
 * The protocol stays in Python: proto/tftp_session.py decides, for a transfer
 * in lockstep (windowsize 1, the block in flight awaiting its ACK), the next
 * steps in advance (ReadSession.lockstep_run: "on the ACK of block b send DATA
 * b+1 = these bytes, on the ACK of b+1 send DATA b+2, ...").  The edge hands
 * that run to this module as a Run; Engine.pump() reads the transfer socket
 * with recvmmsg(2), takes every step whose ACK arrives exactly as expected, and
 * sends the DATA with sendmmsg(2) straight from the run's buffer (a 4-byte
 * header and a pointer into the data: no copy).  Everything else -- any other
 * datagram, an ACK of another block, a peer without a run, the ACK after the
 * run's last step -- is returned to Python untouched, in arrival order, and
 * stops that peer's run (the session must then hear of the steps taken, with
 * ReadSession.lockstep_advance, before it handles the datagram).
 *
 * No protocol decision is made here beyond "is this exactly the expected
 * 4-byte ACK"; the Python reference of a step is LockstepRun.datagram().
 * Non-blocking calls only (MSG_DONTWAIT); the GIL is held throughout.  IPv4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX_VLEN 1024          /* UIO_MAXIOV */

/* ------------------------------------------------------------------ Run */

typedef struct {
    PyObject_HEAD
    PyObject *data;            /* bytes: the payloads of the run's blocks, joined */
    PyObject *peer;            /* the caller's object for this peer (returned with unsent DATA) */
    unsigned int ack;          /* 16-bit number of the ACK that takes the next step */
    Py_ssize_t blksize;
    Py_ssize_t count;          /* steps in the run */
    Py_ssize_t used;           /* steps taken */
    double at;                 /* the `now` of the last step taken */
    int stopped;               /* another datagram came from the peer: no more steps */
} RunObject;

static PyTypeObject RunType;

static int
Run_init(RunObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ack", "data", "blksize", "count", "peer", "used", NULL};
    long ack;
    PyObject *data, *peer;
    Py_ssize_t blksize, count, used = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "lO!nnO|n", kwlist, &ack, &PyBytes_Type, &data,
                                     &blksize, &count, &peer, &used))
        return -1;
    if (ack < 0 || blksize < 1 || blksize > 65464 || count < 1 || count > 65535 || used < 0
        || used > count) {
        PyErr_SetString(PyExc_ValueError,
                        "Run: ack >= 0, 1 <= blksize <= 65464, 1 <= count <= 65535, 0 <= used <= count");
        return -1;
    }
    /* every step but the last carries a whole block; the last carries what is left (maybe 0) */
    if (PyBytes_GET_SIZE(data) > count * blksize || PyBytes_GET_SIZE(data) < (count - 1) * blksize) {
        PyErr_SetString(PyExc_ValueError, "Run: data must hold count blocks (the last may be short)");
        return -1;
    }
    Py_INCREF(data);
    Py_XSETREF(self->data, data);
    Py_INCREF(peer);
    Py_XSETREF(self->peer, peer);
    self->ack = (unsigned int)((ack + used) & 0xFFFF);    /* steps already taken elsewhere */
    self->blksize = blksize;
    self->count = count;
    self->used = used;
    self->at = 0.0;
    self->stopped = 0;
    return 0;
}

static int
Run_traverse(RunObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->data);
    Py_VISIT(self->peer);
    return 0;
}

static int
Run_clear(RunObject *self)
{
    Py_CLEAR(self->data);
    Py_CLEAR(self->peer);
    return 0;
}

static void
Run_dealloc(RunObject *self)
{
    PyObject_GC_UnTrack(self);
    Run_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Run_members[] = {
    {"data", T_OBJECT, offsetof(RunObject, data), READONLY, "the run's payloads, joined"},
    {"peer", T_OBJECT, offsetof(RunObject, peer), READONLY, "the caller's object for the peer"},
    {"blksize", T_PYSSIZET, offsetof(RunObject, blksize), READONLY, "bytes per block"},
    {"count", T_PYSSIZET, offsetof(RunObject, count), READONLY, "steps in the run"},
    {"used", T_PYSSIZET, offsetof(RunObject, used), READONLY, "steps taken"},
    {"at", T_DOUBLE, offsetof(RunObject, at), READONLY, "the time of the last step taken"},
    {"stopped", T_INT, offsetof(RunObject, stopped), READONLY,
     "another datagram came from the peer: the run takes no more steps"},
    {NULL}
};

static PyObject *
Run_get_ack(RunObject *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->ack);
}

static PyGetSetDef Run_getset[] = {
    {"ack", (getter)Run_get_ack, NULL, "the 16-bit block number whose ACK takes the next step", NULL},
    {NULL}
};

static PyTypeObject RunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidusd.net._lockstep.Run",
    .tp_doc = "Run(ack, data, blksize, count, peer, used=0): lockstep steps decided in advance\n"
              "(`used`: the first steps were taken by the caller).",
    .tp_basicsize = sizeof(RunObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Run_init,
    .tp_dealloc = (destructor)Run_dealloc,
    .tp_traverse = (traverseproc)Run_traverse,
    .tp_clear = (inquiry)Run_clear,
    .tp_members = Run_members,
    .tp_getset = Run_getset,
};

/* --------------------------------------------------------------- Engine */

typedef struct {
    PyObject_HEAD
    unsigned int capacity, tx_capacity;
    size_t bufsize;
    struct mmsghdr *rmsgs;
    struct iovec *riov;
    struct sockaddr_in *rnames;
    unsigned char *rdata;
    struct mmsghdr *smsgs;
    struct iovec *siov;          /* two per message: header, block */
    struct sockaddr_in *snames;
    unsigned char (*shdr)[4];
    RunObject **sruns;           /* a reference per message being sent */
} EngineObject;

static void
Engine_free_buffers(EngineObject *self)
{
    PyMem_Free(self->rmsgs); self->rmsgs = NULL;
    PyMem_Free(self->riov); self->riov = NULL;
    PyMem_Free(self->rnames); self->rnames = NULL;
    PyMem_Free(self->rdata); self->rdata = NULL;
    PyMem_Free(self->smsgs); self->smsgs = NULL;
    PyMem_Free(self->siov); self->siov = NULL;
    PyMem_Free(self->snames); self->snames = NULL;
    PyMem_Free(self->shdr); self->shdr = NULL;
    PyMem_Free(self->sruns); self->sruns = NULL;
}

static int
Engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "bufsize", "tx_capacity", NULL};
    unsigned int capacity = 64, tx_capacity = 256;
    Py_ssize_t bufsize = 2048;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|InI", kwlist, &capacity, &bufsize, &tx_capacity))
        return -1;
    if (capacity < 1 || capacity > MAX_VLEN || tx_capacity < 1 || tx_capacity > MAX_VLEN
        || bufsize < 16 || bufsize > 65536) {
        PyErr_SetString(PyExc_ValueError, "Engine: capacity and tx_capacity 1..1024, bufsize 16..65536");
        return -1;
    }
    Engine_free_buffers(self);
    self->capacity = capacity;
    self->tx_capacity = tx_capacity;
    self->bufsize = (size_t)bufsize;
    self->rmsgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->riov = PyMem_Calloc(capacity, sizeof(struct iovec));
    self->rnames = PyMem_Calloc(capacity, sizeof(struct sockaddr_in));
    self->rdata = PyMem_Malloc((size_t)capacity * (size_t)bufsize);
    self->smsgs = PyMem_Calloc(tx_capacity, sizeof(struct mmsghdr));
    self->siov = PyMem_Calloc((size_t)tx_capacity * 2, sizeof(struct iovec));
    self->snames = PyMem_Calloc(tx_capacity, sizeof(struct sockaddr_in));
    self->shdr = PyMem_Calloc(tx_capacity, 4);
    self->sruns = PyMem_Calloc(tx_capacity, sizeof(RunObject *));
    if (!self->rmsgs || !self->riov || !self->rnames || !self->rdata || !self->smsgs || !self->siov
        || !self->snames || !self->shdr || !self->sruns) {
        Engine_free_buffers(self);
        PyErr_NoMemory();
        return -1;
    }
    for (unsigned int i = 0; i < capacity; i++) {
        self->riov[i].iov_base = self->rdata + (size_t)i * (size_t)bufsize;
        self->riov[i].iov_len = (size_t)bufsize;
        self->rmsgs[i].msg_hdr.msg_iov = &self->riov[i];
        self->rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (unsigned int i = 0; i < tx_capacity; i++) {
        self->siov[2 * i].iov_base = self->shdr[i];
        self->siov[2 * i].iov_len = 4;
        self->smsgs[i].msg_hdr.msg_name = &self->snames[i];
        self->smsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        self->smsgs[i].msg_hdr.msg_iov = &self->siov[2 * i];
        self->smsgs[i].msg_hdr.msg_iovlen = 2;
    }
    return 0;
}

static void
Engine_dealloc(EngineObject *self)
{
    Engine_free_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The bytes of slot i as one datagram (header + block), for the caller's outbox. */
static PyObject *
slot_bytes(EngineObject *self, unsigned int i)
{
    size_t n = self->siov[2 * i + 1].iov_len;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 + n));
    if (b == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(b), self->shdr[i], 4);
    if (n)
        memcpy(PyBytes_AS_STRING(b) + 4, self->siov[2 * i + 1].iov_base, n);
    return b;
}

/* Send slots [0, k); what is refused with EAGAIN (or not sent because sending is off) goes to
 * `unsent` as (bytes, peer).  Returns -1 on a Python error (the slots' references are released
 * either way). */
static int
send_slots(EngineObject *self, int fd, unsigned int k, int sending, PyObject *unsent,
           Py_ssize_t *errors, int *blocked)
{
    unsigned int off = 0;
    int rc = 0;
    while (sending && off < k) {
        int m = sendmmsg(fd, self->smsgs + off, k - off, MSG_DONTWAIT);
        if (m > 0) {
            off += (unsigned int)m;
            continue;
        }
        if (m == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ENOBUFS) {
            *blocked = 1;
            break;
        }
        (*errors)++;                 /* this datagram is dropped; the transfer's timer recovers */
        off++;
    }
    for (unsigned int i = off; i < k; i++) {
        if (rc == 0) {
            PyObject *b = slot_bytes(self, i);
            PyObject *item = b ? PyTuple_Pack(2, b, self->sruns[i]->peer) : NULL;
            Py_XDECREF(b);
            if (item == NULL || PyList_Append(unsent, item) < 0)
                rc = -1;
            Py_XDECREF(item);
        }
    }
    for (unsigned int i = 0; i < k; i++)
        Py_CLEAR(self->sruns[i]);
    return rc;
}

/* On an error: drop the references of slots [0, k) without sending (the timers recover). */
static void
release_slots(EngineObject *self, unsigned int k)
{
    for (unsigned int i = 0; i < k; i++)
        Py_CLEAR(self->sruns[i]);
}

PyDoc_STRVAR(pump_doc,
"pump(fd, runs, now, rounds, sending) -> (rest, unsent, rx, calls, send_errors, blocked, rx_errno)\n\n"
"Up to `rounds` recvmmsg calls on the non-blocking UDP socket `fd`.  A datagram that is\n"
"exactly the 4-byte ACK a Run in `runs` (dict: 6-byte peer key -> Run) waits for takes\n"
"that run's next step: its DATA is sent (sendmmsg, once per round) or, if `sending` is\n"
"false or the kernel refuses it for now, returned in `unsent` as (bytes, run.peer).\n"
"Every other datagram is returned in `rest` as (payload, key, truncated), in order, and\n"
"stops its peer's run.  `rx`: datagrams read; `calls`: recvmmsg calls that returned some;\n"
"`send_errors`: DATA dropped on an error other than EAGAIN; `blocked`: the send buffer\n"
"was full (reading stopped there); `rx_errno`: a receive error other than EAGAIN, or 0.");

static PyObject *
Engine_pump(EngineObject *self, PyObject *args)
{
    int fd, rounds, sending;
    PyObject *runs;
    double now;
    if (!PyArg_ParseTuple(args, "iO!dip", &fd, &PyDict_Type, &runs, &now, &rounds, &sending))
        return NULL;
    PyObject *rest = PyList_New(0), *unsent = PyList_New(0);
    if (rest == NULL || unsent == NULL)
        goto fail;
    Py_ssize_t rx = 0, calls = 0, errors = 0;
    int blocked = 0, rx_errno = 0;
    const size_t bs = self->bufsize;

    for (int r = 0; r < rounds && !blocked; r++) {
        for (unsigned int i = 0; i < self->capacity; i++) {
            self->rmsgs[i].msg_hdr.msg_name = &self->rnames[i];
            self->rmsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            self->rmsgs[i].msg_hdr.msg_control = NULL;
            self->rmsgs[i].msg_hdr.msg_controllen = 0;
            self->rmsgs[i].msg_hdr.msg_flags = 0;
        }
        int n = recvmmsg(fd, self->rmsgs, self->capacity, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                rx_errno = errno;
            break;
        }
        if (n == 0)
            break;
        calls++;
        rx += n;
        unsigned int k = 0;
        for (int i = 0; i < n; i++) {
            const unsigned char *d = self->rdata + (size_t)i * bs;
            size_t len = self->rmsgs[i].msg_len;
            int trunc = (self->rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC) || len > bs;
            PyObject *key = PyBytes_FromStringAndSize((const char *)&self->rnames[i].sin_port, 6);
            if (key == NULL) {
                release_slots(self, k);
                goto fail;
            }
            PyObject *found = PyDict_GetItemWithError(runs, key);        /* borrowed */
            if (found == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                release_slots(self, k);
                goto fail;
            }
            if (found != NULL && Py_IS_TYPE(found, &RunType)) {
                RunObject *run = (RunObject *)found;
                if (!run->stopped && !trunc && len == 4 && d[0] == 0 && d[1] == 4
                    && (((unsigned int)d[2] << 8) | d[3]) == run->ack && run->used < run->count) {
                    if (k == self->tx_capacity) {             /* a full batch: send it first */
                        if (send_slots(self, fd, k, !blocked, unsent, &errors, &blocked) < 0) {
                            Py_DECREF(key);
                            goto fail;
                        }
                        k = 0;
                    }
                    Py_ssize_t dlen = PyBytes_GET_SIZE(run->data);
                    Py_ssize_t off = run->used * run->blksize;
                    Py_ssize_t take = dlen - off < run->blksize ? dlen - off : run->blksize;
                    unsigned int block = (run->ack + 1) & 0xFFFF;
                    self->shdr[k][0] = 0;
                    self->shdr[k][1] = 3;                     /* DATA */
                    self->shdr[k][2] = (unsigned char)(block >> 8);
                    self->shdr[k][3] = (unsigned char)(block & 0xFF);
                    self->siov[2 * k + 1].iov_base = PyBytes_AS_STRING(run->data) + off;
                    self->siov[2 * k + 1].iov_len = (size_t)(take > 0 ? take : 0);
                    self->snames[k] = self->rnames[i];
                    Py_INCREF(run);
                    self->sruns[k] = run;
                    k++;
                    run->used++;
                    run->ack = block;
                    run->at = now;
                    Py_DECREF(key);
                    continue;
                }
                run->stopped = 1;
            }
            PyObject *payload = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)(len > bs ? bs : len));
            PyObject *item = payload ? PyTuple_Pack(3, payload, key, trunc ? Py_True : Py_False) : NULL;
            Py_XDECREF(payload);
            Py_DECREF(key);
            if (item == NULL || PyList_Append(rest, item) < 0) {
                Py_XDECREF(item);
                release_slots(self, k);
                goto fail;
            }
            Py_DECREF(item);
        }
        if (send_slots(self, fd, k, sending && !blocked, unsent, &errors, &blocked) < 0)
            goto fail;
    }
    return Py_BuildValue("(NNnnnii)", rest, unsent, rx, calls, errors, blocked, rx_errno);

fail:
    Py_XDECREF(rest);
    Py_XDECREF(unsent);
    return NULL;
}

static PyMethodDef Engine_methods[] = {
    {"pump", (PyCFunction)Engine_pump, METH_VARARGS, pump_doc},
    {NULL}
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidusd.net._lockstep.Engine",
    .tp_doc = "Engine(capacity=64, bufsize=2048, tx_capacity=256): recvmmsg/sendmmsg buffers.",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef lockstep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidusd.net._lockstep",
    .m_doc = "Lockstep TFTP steps decided by the Python session, carried out with recvmmsg/sendmmsg.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lockstep(void)
{
    if (PyType_Ready(&RunType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lockstep_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Run", (PyObject *)&RunType) < 0
        || PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
