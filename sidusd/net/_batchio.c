/*
 * sidusd.net._lockstep, batched datagram I/O: Receiver and Sender, the recvmmsg(2) and
 * sendmmsg(2) behind sidusd.net.mmsg (which keeps a one-call-per-datagram path for when this
 * module is not built).  Non-blocking calls only (MSG_DONTWAIT); the GIL is held throughout.
 *
 * Receiver.recv(fd) -> [(payload, peer_key, truncated)]: a datagram whose sender is not an
 * IPv4 sockaddr_in is dropped and counted in Receiver.dropped.
 * Sender.send(fd, payloads, peers, start) -> (sent, errno): a payload is bytes (one datagram)
 * or a tuple of bytes (one UDP GSO message, UDP_SEGMENT = the first part's length); the
 * kernel is pointed at the bytes' own buffers, each payload held by a reference until the
 * call that sends it returns; a peer is any object whose `key` is a 6-byte peer key.
 */
#include "_lockstep.h"

#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103            /* linux/udp.h */
#endif
#define SEG_SPACE CMSG_SPACE(sizeof(uint16_t))

/* ------------------------------------------------------------- Receiver */

typedef struct {
    PyObject_HEAD
    unsigned int capacity;
    size_t bufsize;
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_in *names;
    unsigned char *data;
    Py_ssize_t dropped;            /* datagrams from a sender that is not a sockaddr_in */
} ReceiverObject;

static void
Receiver_dealloc(ReceiverObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(self->msgs);
    PyMem_Free(self->iov);
    PyMem_Free(self->names);
    PyMem_Free(self->data);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "bufsize", NULL};
    unsigned int capacity = 64;
    Py_ssize_t bufsize = 2048;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|In", kwlist, &capacity, &bufsize))
        return NULL;
    if (capacity < 1 || capacity > MAX_VLEN || bufsize < 16 || bufsize > 65536) {
        PyErr_SetString(PyExc_ValueError, "Receiver: capacity 1..1024, bufsize 16..65536");
        return NULL;
    }
    ReceiverObject *self = (ReceiverObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->capacity = capacity;
    self->bufsize = (size_t)bufsize;
    self->msgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->iov = PyMem_Calloc(capacity, sizeof(struct iovec));
    self->names = PyMem_Calloc(capacity, sizeof(struct sockaddr_in));
    self->data = PyMem_Malloc((size_t)capacity * (size_t)bufsize);
    if (!self->msgs || !self->iov || !self->names || !self->data) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (unsigned int i = 0; i < capacity; i++) {
        self->iov[i].iov_base = self->data + (size_t)i * self->bufsize;
        self->iov[i].iov_len = self->bufsize;
        self->msgs[i].msg_hdr.msg_iov = &self->iov[i];
        self->msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return (PyObject *)self;
}

static PyObject *
Receiver_recv(ReceiverObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    for (unsigned int i = 0; i < self->capacity; i++) {
        struct msghdr *h = &self->msgs[i].msg_hdr;
        h->msg_name = &self->names[i];
        h->msg_namelen = sizeof(struct sockaddr_in);
        h->msg_control = NULL;
        h->msg_controllen = 0;
        h->msg_flags = 0;
    }
    int n = recvmmsg(fd, self->msgs, self->capacity, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        if (!is_inet_peer(&self->names[i], self->msgs[i].msg_hdr.msg_namelen)) {
            self->dropped++;
            continue;
        }
        size_t len = self->msgs[i].msg_len;
        int trunc = (self->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) || len > self->bufsize;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)self->iov[i].iov_base,
                                                      (Py_ssize_t)(trunc ? self->bufsize : len));
        PyObject *key = payload ? peer_key_bytes(&self->names[i]) : NULL;
        PyObject *item = key ? PyTuple_Pack(3, payload, key, trunc ? Py_True : Py_False) : NULL;
        Py_XDECREF(payload);
        Py_XDECREF(key);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyMethodDef Receiver_methods[] = {
    {"recv", (PyCFunction)Receiver_recv, METH_VARARGS,
     "recv(fd) -> [(payload, peer_key, truncated)]: the datagrams waiting (at most capacity)."},
    {NULL}
};

static PyMemberDef Receiver_members[] = {
    {"dropped", T_PYSSIZET, offsetof(ReceiverObject, dropped), READONLY,
     "datagrams dropped: the sender was not an IPv4 sockaddr_in"},
    {NULL}
};

static PyType_Slot Receiver_slots[] = {
    {Py_tp_doc, "Receiver(capacity=64, bufsize=2048): recvmmsg buffers for `capacity` datagrams."},
    {Py_tp_new, Receiver_new},
    {Py_tp_dealloc, Receiver_dealloc},
    {Py_tp_methods, Receiver_methods},
    {Py_tp_members, Receiver_members},
    {0, NULL}
};

static PyType_Spec Receiver_spec = {
    .name = "sidusd.net._lockstep.Receiver",
    .basicsize = sizeof(ReceiverObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Receiver_slots,
};

/* --------------------------------------------------------------- Sender */

typedef struct {
    PyObject_HEAD
    unsigned int capacity;
    Py_ssize_t max_iov;
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_in *names;
    unsigned char *ctrl;           /* one UDP_SEGMENT cmsg per message */
    PyObject **refs;               /* the payload of each message of the call being built */
} SenderObject;

static void
Sender_dealloc(SenderObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(self->msgs);
    PyMem_Free(self->iov);
    PyMem_Free(self->names);
    PyMem_Free(self->ctrl);
    PyMem_Free(self->refs);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Sender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "max_iov", NULL};
    unsigned int capacity = 256;
    Py_ssize_t max_iov = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|In", kwlist, &capacity, &max_iov))
        return NULL;
    if (capacity < 1 || capacity > MAX_VLEN || max_iov < (Py_ssize_t)capacity || max_iov > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "Sender: capacity 1..1024, capacity <= max_iov <= 2**20");
        return NULL;
    }
    SenderObject *self = (SenderObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->capacity = capacity;
    self->max_iov = max_iov;
    self->msgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->iov = PyMem_Calloc((size_t)max_iov, sizeof(struct iovec));
    self->names = PyMem_Calloc(capacity, sizeof(struct sockaddr_in));
    self->ctrl = PyMem_Calloc(capacity, SEG_SPACE);
    self->refs = PyMem_Calloc(capacity, sizeof(PyObject *));
    if (!self->msgs || !self->iov || !self->names || !self->ctrl || !self->refs) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (unsigned int i = 0; i < capacity; i++) {
        self->msgs[i].msg_hdr.msg_name = &self->names[i];
        self->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    return (PyObject *)self;
}

static void
release_refs(SenderObject *self, unsigned int k)
{
    for (unsigned int i = 0; i < k; i++)
        Py_CLEAR(self->refs[i]);
}

/* The sockaddr_in of message k from `peer`'s 6-byte `key`.  -1 on a Python error. */
static int
set_name(SenderObject *self, unsigned int k, PyObject *peer, PyObject *str_key)
{
    PyObject *key = PyObject_GetAttr(peer, str_key);
    if (key == NULL)
        return -1;
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != KEY_LEN) {
        Py_DECREF(key);
        PyErr_SetString(PyExc_TypeError, "peer.key must be 6 bytes (mmsg.peer_key)");
        return -1;
    }
    memset(&self->names[k], 0, sizeof(struct sockaddr_in));
    self->names[k].sin_family = AF_INET;
    memcpy(&self->names[k].sin_port, PyBytes_AS_STRING(key), KEY_LEN);
    Py_DECREF(key);
    return 0;
}

/* Message k from payload p, its iovecs from *v on.  1: done; 0: no room for it in this call
 * (k > 0); -1: a Python error. */
static int
set_message(SenderObject *self, unsigned int k, PyObject *p, Py_ssize_t *v)
{
    struct msghdr *h = &self->msgs[k].msg_hdr;
    h->msg_control = NULL;
    h->msg_controllen = 0;
    if (PyBytes_CheckExact(p)) {
        if (*v >= self->max_iov)
            return 0;
        self->iov[*v].iov_base = PyBytes_AS_STRING(p);
        self->iov[*v].iov_len = (size_t)PyBytes_GET_SIZE(p);
        h->msg_iov = &self->iov[*v];
        h->msg_iovlen = 1;
        (*v)++;
        return 1;
    }
    if (!PyTuple_CheckExact(p)) {
        PyErr_Format(PyExc_TypeError, "payload must be bytes, not %.100s", Py_TYPE(p)->tp_name);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(p);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "an empty GSO group");
        return -1;
    }
    if (*v + n > self->max_iov) {
        if (k)
            return 0;
        PyErr_Format(PyExc_ValueError, "a GSO group of %zd parts needs more than %zd iovecs", n,
                     self->max_iov);
        return -1;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *part = PyTuple_GET_ITEM(p, j);
        if (!PyBytes_CheckExact(part)) {
            PyErr_Format(PyExc_TypeError, "payload must be bytes, not %.100s", Py_TYPE(part)->tp_name);
            return -1;
        }
        self->iov[*v + j].iov_base = PyBytes_AS_STRING(part);
        self->iov[*v + j].iov_len = (size_t)PyBytes_GET_SIZE(part);
    }
    h->msg_iov = &self->iov[*v];
    h->msg_iovlen = (size_t)n;
    h->msg_control = self->ctrl + (size_t)k * SEG_SPACE;
    h->msg_controllen = SEG_SPACE;
    struct cmsghdr *c = CMSG_FIRSTHDR(h);
    uint16_t seg = (uint16_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 0));
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(seg));
    memcpy(CMSG_DATA(c), &seg, sizeof(seg));
    *v += n;
    return 1;
}

static PyObject *
Sender_send(SenderObject *self, PyObject *args)
{
    int fd;
    PyObject *payloads, *peers;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "iO!O!|n", &fd, &PyList_Type, &payloads, &PyList_Type, &peers, &start))
        return NULL;
    lockstep_state *st = PyType_GetModuleState(Py_TYPE(self));
    if (st == NULL)
        return NULL;
    Py_ssize_t i = start < 0 ? 0 : start;
    start = i;
    while (i < PyList_GET_SIZE(payloads)) {
        unsigned int k = 0;
        Py_ssize_t v = 0;
        /* the lists are read afresh for each message: a peer's `key` may run Python code */
        while (k < self->capacity && i + k < PyList_GET_SIZE(payloads)) {
            if (i + k >= PyList_GET_SIZE(peers)) {
                release_refs(self, k);
                PyErr_SetString(PyExc_IndexError, "fewer peers than payloads");
                return NULL;
            }
            PyObject *p = Py_NewRef(PyList_GET_ITEM(payloads, i + k));
            int rc = set_message(self, k, p, &v);
            if (rc <= 0) {
                Py_DECREF(p);
                if (rc == 0)
                    break;
                release_refs(self, k);
                return NULL;
            }
            self->refs[k] = p;
            PyObject *peer = Py_NewRef(PyList_GET_ITEM(peers, i + k));
            rc = set_name(self, k, peer, st->str_key);
            Py_DECREF(peer);
            k++;
            if (rc < 0) {
                release_refs(self, k);
                return NULL;
            }
        }
        int n = sendmmsg(fd, self->msgs, k, MSG_DONTWAIT);
        int err = errno;
        release_refs(self, k);
        if (n < 0)
            return Py_BuildValue("(ni)", i - start, err ? err : EIO);
        i += n;
    }
    return Py_BuildValue("(ni)", i - start, 0);
}

static PyMethodDef Sender_methods[] = {
    {"send", (PyCFunction)Sender_send, METH_VARARGS,
     "send(fd, payloads, peers, start=0) -> (sent, errno): payloads[start:] in sendmmsg calls;\n"
     "stops at the first message the kernel refuses (errno says why; 0: all sent)."},
    {NULL}
};

static PyType_Slot Sender_slots[] = {
    {Py_tp_doc, "Sender(capacity=256, max_iov=4096): sendmmsg buffers, `capacity` messages per call."},
    {Py_tp_new, Sender_new},
    {Py_tp_dealloc, Sender_dealloc},
    {Py_tp_methods, Sender_methods},
    {0, NULL}
};

static PyType_Spec Sender_spec = {
    .name = "sidusd.net._lockstep.Sender",
    .basicsize = sizeof(SenderObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Sender_slots,
};

int
batchio_exec(PyObject *m, lockstep_state *st)
{
    st->receiver_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Receiver_spec, NULL);
    if (st->receiver_type == NULL || PyModule_AddType(m, st->receiver_type) < 0)
        return -1;
    st->sender_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Sender_spec, NULL);
    if (st->sender_type == NULL || PyModule_AddType(m, st->sender_type) < 0)
        return -1;
    return 0;
}
