/*
 * sidusd.net._lockstep: the lockstep TFTP steps carried out in C (optional accelerator).
 *
 * The protocol stays in Python: proto/tftp_session.py decides, for a transfer
 * in lockstep (the block in flight awaiting its ACK) or with a whole window in
 * flight (RFC 7440: windowsize W, every block up to the window's end sent), the
 * next steps in advance (ReadSession.lockstep_run: "on the ACK of block b send
 * DATA b+1 .. b+W = these bytes, on the ACK of b+W send the next W, ...").  The edge hands
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
 * Non-blocking calls only (MSG_DONTWAIT); the GIL is held throughout.  IPv4: a datagram
 * whose sender is not a sockaddr_in is dropped and counted (PumpResult.dropped).
 * Heap types and multi-phase init (PEP 489); objects are built in tp_new only.
 * The batched I/O of net/mmsg.py (Receiver, Sender) is in _batchio.c.
 */
#include "_lockstep.h"

#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* ------------------------------------------------------------------ Run */


static PyObject *
Run_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ack", "data", "blksize", "count", "peer", "used", "fd", "offset", "size",
                             "window", NULL};
    long ack;
    PyObject *data, *peer;
    Py_ssize_t blksize, count, used = 0, size = -1, window = 1;
    int fd = -1;
    long long offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "lO!nnO|n$iLnn", kwlist, &ack, &PyBytes_Type, &data,
                                     &blksize, &count, &peer, &used, &fd, &offset, &size, &window))
        return NULL;
    if (ack < 0 || blksize < 1 || blksize > 65464 || count < 1 || count > 65535 || used < 0
        || used > count) {
        PyErr_SetString(PyExc_ValueError,
                        "Run: ack >= 0, 1 <= blksize <= 65464, 1 <= count <= 65535, 0 <= used <= count");
        return NULL;
    }
    if (window < 1 || window > MAX_VLEN || window * blksize > RUN_STEP_MAX_BYTES) {
        PyErr_SetString(PyExc_ValueError, "Run: 1 <= window <= 1024, window x blksize <= 1 MiB");
        return NULL;
    }
    if (fd >= 0 && (PyBytes_GET_SIZE(data) != 0 || offset < 0 || size < 0)) {
        PyErr_SetString(PyExc_ValueError, "Run: a file run (fd) has empty data, offset >= 0 and size >= 0");
        return NULL;
    }
    if (fd < 0)
        size = PyBytes_GET_SIZE(data);
    /* every step but the last carries a whole block; the last carries what is left (maybe 0) */
    if (size > count * blksize || size < (count - 1) * blksize) {
        PyErr_SetString(PyExc_ValueError, "Run: data must hold count blocks (the last may be short)");
        return NULL;
    }
    int dup = -1;
    if (fd >= 0 && (dup = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    RunObject *self = (RunObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        if (dup >= 0)
            close(dup);
        return NULL;
    }
    self->data = Py_NewRef(data);
    self->peer = Py_NewRef(peer);
    self->ack = (unsigned int)((ack + used) & 0xFFFF);    /* steps already taken elsewhere */
    self->blksize = blksize;
    self->count = count;
    self->used = used;
    self->window = window;
    self->fd = dup;
    self->offset = offset;
    self->size = size;
    Py_ssize_t step = window * blksize;    /* a read holds whole steps (_runread.c) */
    self->buf_cap = RUN_READ_BYTES < step ? step : RUN_READ_BYTES / step * step;
    return (PyObject *)self;
}

static int
Run_traverse(RunObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
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
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Run_clear(self);
    if (self->fd >= 0)
        close(self->fd);
    PyMem_Free(self->buf);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Run_get_ack(RunObject *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->ack);
}

static PyMemberDef Run_members[] = {
    {"data", T_OBJECT, offsetof(RunObject, data), READONLY, "the run's payloads, joined"},
    {"peer", T_OBJECT, offsetof(RunObject, peer), READONLY, "the caller's object for the peer"},
    {"blksize", T_PYSSIZET, offsetof(RunObject, blksize), READONLY, "bytes per block"},
    {"count", T_PYSSIZET, offsetof(RunObject, count), READONLY, "blocks in the run"},
    {"used", T_PYSSIZET, offsetof(RunObject, used), READONLY, "blocks sent (by its steps)"},
    {"window", T_PYSSIZET, offsetof(RunObject, window), READONLY,
     "blocks a step sends (1: lockstep); the ACK of a step's last block takes the next"},
    {"at", T_DOUBLE, offsetof(RunObject, at), READONLY, "the time of the last step taken"},
    {"stopped", T_INT, offsetof(RunObject, stopped), READONLY,
     "another datagram came from the peer (or a read failed): the run takes no more steps"},
    {"size", T_PYSSIZET, offsetof(RunObject, size), READONLY, "the payloads' bytes in all"},
    {"reads", T_PYSSIZET, offsetof(RunObject, reads), READONLY, "a file run: the reads it made"},
    {"read_errno", T_INT, offsetof(RunObject, read_errno), READONLY,
     "a file run: the errno of the read that stopped it (EIO: the file ended early), or 0"},
    {NULL}
};

static PyGetSetDef Run_getset[] = {
    {"ack", (getter)Run_get_ack, NULL, "the 16-bit number of the block whose ACK takes the next step",
     NULL},
    {NULL}
};

static PyType_Slot Run_slots[] = {
    {Py_tp_doc, "Run(ack, data, blksize, count, peer, used=0, *, fd=-1, offset=0, size=-1, window=1):\n"
                "the steps of `count` blocks decided in advance, `window` blocks a step (`used`:\n"
                "the first blocks were sent by the caller); with `fd`, empty `data`: the payloads\n"
                "are the file's `size` bytes from `offset` (block 0's), read by the run (it keeps\n"
                "a duplicate of `fd`)."},
    {Py_tp_new, Run_new},
    {Py_tp_dealloc, Run_dealloc},
    {Py_tp_traverse, Run_traverse},
    {Py_tp_clear, Run_clear},
    {Py_tp_members, Run_members},
    {Py_tp_getset, Run_getset},
    {0, NULL}
};

PyType_Spec Run_spec = {
    .name = "sidusd.net._lockstep.Run",
    .basicsize = sizeof(RunObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Run_slots,
};

/* --------------------------------------------------------- PumpResult */

static PyStructSequence_Field pump_result_fields[] = {
    {"rest", "[(payload, key, truncated)]: the datagrams that took no step, in order"},
    {"unsent", "[(bytes, run.peer)]: DATA not sent (sending off, or the kernel refused it for now)"},
    {"rx", "datagrams read"},
    {"calls", "recvmmsg calls that returned some"},
    {"send_errors", "DATA dropped on a send error other than EAGAIN"},
    {"blocked", "the send buffer was full, or GSO was refused (reading stopped there)"},
    {"rx_errno", "a receive error other than EAGAIN, or 0"},
    {"dropped", "datagrams whose sender was not an IPv4 sockaddr_in (dropped)"},
    {"gso_refused", "the kernel refused a GSO message: it and what followed are in unsent"},
    {NULL, NULL}
};

static PyStructSequence_Desc pump_result_desc = {
    "sidusd.net._lockstep.PumpResult",
    "What Engine.pump did; the first seven fields unpack like a tuple.",
    pump_result_fields,
    7,                          /* `dropped` and `gso_refused` by name only */
};

/* --------------------------------------------------------------- module */

static int
lockstep_exec(PyObject *m)
{
    lockstep_state *st = PyModule_GetState(m);
    st->run_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Run_spec, NULL);
    if (st->run_type == NULL || PyModule_AddType(m, st->run_type) < 0)
        return -1;
    st->engine_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Engine_spec, NULL);
    if (st->engine_type == NULL || PyModule_AddType(m, st->engine_type) < 0)
        return -1;
    st->pump_result_type = PyStructSequence_NewType(&pump_result_desc);
    if (st->pump_result_type == NULL || PyModule_AddType(m, st->pump_result_type) < 0)
        return -1;
    st->str_key = PyUnicode_InternFromString("key");
    if (st->str_key == NULL)
        return -1;
    return batchio_exec(m, st);
}

static int
lockstep_traverse(PyObject *m, visitproc visit, void *arg)
{
    lockstep_state *st = PyModule_GetState(m);
    Py_VISIT(st->run_type);
    Py_VISIT(st->engine_type);
    Py_VISIT(st->pump_result_type);
    Py_VISIT(st->receiver_type);
    Py_VISIT(st->sender_type);
    return 0;
}

static int
lockstep_clear(PyObject *m)
{
    lockstep_state *st = PyModule_GetState(m);
    Py_CLEAR(st->run_type);
    Py_CLEAR(st->engine_type);
    Py_CLEAR(st->pump_result_type);
    Py_CLEAR(st->receiver_type);
    Py_CLEAR(st->sender_type);
    Py_CLEAR(st->str_key);
    return 0;
}

static void
lockstep_free(void *m)
{
    lockstep_clear((PyObject *)m);
}

static PyModuleDef_Slot lockstep_slots[] = {
    {Py_mod_exec, lockstep_exec},
    {0, NULL}
};

static struct PyModuleDef lockstep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidusd.net._lockstep",
    .m_doc = "Lockstep TFTP steps decided by the Python session, carried out with recvmmsg/sendmmsg;\n"
             "and the batched datagram I/O of sidusd.net.mmsg (Receiver, Sender).",
    .m_size = sizeof(lockstep_state),
    .m_slots = lockstep_slots,
    .m_traverse = lockstep_traverse,
    .m_clear = lockstep_clear,
    .m_free = lockstep_free,
};

PyMODINIT_FUNC
PyInit__lockstep(void)
{
    return PyModuleDef_Init(&lockstep_module);
}
