/*
 * sidusd.net._lockstep: what its C files share (_lockstep.c: the module and Run; _runread.c:
 * a run's payloads, from its file; _engine.c: Engine; _sendbatch.c: the DATA an Engine.pump
 * round sends; _wait.c: Engine.pump's wait; _batchio.c: Receiver and Sender, the batched system calls behind net/mmsg.py).
 */
#ifndef SIDUS_LOCKSTEP_H
#define SIDUS_LOCKSTEP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_VLEN 1024          /* UIO_MAXIOV: the kernel's cap per call */
#define KEY_LEN 6              /* a peer key: sin_port then sin_addr, as they lie in sockaddr_in */

/* The peer key is read straight out of a sockaddr_in: port (2 bytes) then address (4). */
_Static_assert(sizeof(((struct sockaddr_in *)0)->sin_port) == 2, "sin_port is 16 bits");
_Static_assert(sizeof(((struct sockaddr_in *)0)->sin_addr) == 4, "sin_addr is 32 bits");
_Static_assert(offsetof(struct sockaddr_in, sin_addr) == offsetof(struct sockaddr_in, sin_port) + 2,
               "sin_addr follows sin_port: the 6 key bytes are contiguous");

/* The module's state (multi-phase init, PEP 489): its heap types and an interned name. */
typedef struct {
    PyTypeObject *run_type;
    PyTypeObject *engine_type;
    PyTypeObject *pump_result_type;
    PyTypeObject *receiver_type;
    PyTypeObject *sender_type;
    PyObject *str_key;          /* "key": the attribute of an mmsg.Peer */
} lockstep_state;

/* Whether a received name is an IPv4 peer the key can describe. */
static inline int
is_inet_peer(const struct sockaddr_in *sa, socklen_t namelen)
{
    return namelen == sizeof(struct sockaddr_in) && sa->sin_family == AF_INET;
}

static inline PyObject *
peer_key_bytes(const struct sockaddr_in *sa)
{
    return PyBytes_FromStringAndSize((const char *)&sa->sin_port, KEY_LEN);
}

/* _lockstep.c: a run of lockstep steps (what Engine.pump reads and advances). */
typedef struct {
    PyObject_HEAD
    PyObject *data;            /* bytes: the payloads of the run's blocks, joined */
    PyObject *peer;            /* the caller's object for this peer (returned with unsent DATA) */
    unsigned int ack;          /* 16-bit number of the ACK that takes the next step */
    Py_ssize_t blksize;
    Py_ssize_t count;          /* blocks in the run */
    Py_ssize_t used;           /* blocks sent */
    Py_ssize_t window;         /* blocks a step sends: the ACK of a step's last block takes the next */
    double at;                 /* the `now` of the last step taken */
    int stopped;               /* another datagram came from the peer: no more steps */
    /* a file run (fd >= 0): `data` is empty; the payloads are the file's bytes from `offset`
     * (step 0's), `size` of them in all, read by C (_runread.c) into `buf` as they are needed */
    int fd;                    /* a duplicate, closed with the run; -1: the payloads are `data` */
    long long offset;
    Py_ssize_t size;           /* the payloads' bytes (a file run; `data`'s length otherwise) */
    unsigned char *buf;        /* what was read: run bytes [buf_from, buf_from + buf_len) */
    Py_ssize_t buf_cap, buf_from, buf_len;
    int read_errno;            /* the read that stopped the run, or 0 */
    Py_ssize_t reads;          /* reads made */
} RunObject;

/* The blocks the run's next step sends (its window, or what is left of the run). */
static inline Py_ssize_t
run_step_blocks(const RunObject *run)
{
    return run->count - run->used < run->window ? run->count - run->used : run->window;
}

/* _runread.c: the payloads of a run's next step (blocks run->used ...), from `data` or its file. */
#define RUN_READ_BYTES (256 * 1024)   /* a file run reads this much at a time (whole steps) */
#define RUN_STEP_MAX_BYTES (1024 * 1024)    /* window x blksize, at most */
int run_next_ready(const RunObject *run);           /* 1: no read needed for the next step */
int run_read_next(RunObject *run);                  /* 0, or -1 with read_errno set */
void run_next_payload(const RunObject *run, Py_ssize_t i, const char **p, size_t *len);

/* _sendbatch.c: the DATA of the steps an Engine.pump round took, sent with one sendmmsg(2):
 * a message per block, or with GSO (UDP_SEGMENT) a message per window (or part of one). */
#define GSO_MAX_SEGS 64                     /* UDP_MAX_SEGMENTS of older kernels */
#define GSO_MAX_BYTES 65507                 /* the most UDP payload in one IPv4 message */
struct send_batch {
    unsigned int cap;           /* messages, and blocks, at most */
    unsigned int k, nb;         /* messages and blocks filled, not yet sent */
    struct mmsghdr *msgs;
    struct iovec *iov;          /* two per block: header, payload */
    struct sockaddr_in *names;  /* one per message */
    unsigned char (*hdr)[4];    /* one per block */
    unsigned char *ctrl;        /* a UDP_SEGMENT cmsg per message */
    unsigned int *blocks;       /* blocks per message */
    RunObject **runs;           /* a reference per message */
};
int sb_init(struct send_batch *sb, unsigned int cap);         /* -1: no memory */
void sb_free(struct send_batch *sb);
int sb_fits(const struct send_batch *sb, const RunObject *run);
int sb_holds(const struct send_batch *sb, const RunObject *run);
void sb_add_step(struct send_batch *sb, RunObject *run, const struct sockaddr_in *name, double now,
                 int gso);
int sb_send(struct send_batch *sb, int fd, int sending, PyObject *unsent, Py_ssize_t *errors,
            int *blocked, int *gso_refused);

/* _wait.c: Engine.pump's wait for the ACKs of what it sent, and how those waits went. */
struct spin_policy {
    long misses;                /* waits in a row readable only beyond 4x their spin */
    long probe;                 /* then one wait in `probe` spins (_wait.c) */
    Py_ssize_t waits, spun;     /* waits so far, and those that spun first */
    Py_ssize_t woken;           /* ... and those the event loop's other work ended */
};
#define WAIT_WOKEN 2
long us_between(const struct timespec *t0, const struct timespec *t1);
long us_since(const struct timespec *t0);
int wait_readable(struct spin_policy *sp, int fd, int wake_fd, const struct timespec *sent, long us,
                  long spin_us);

extern PyType_Spec Run_spec;       /* _lockstep.c */
extern PyType_Spec Engine_spec;    /* _engine.c */

/* _batchio.c: add Receiver and Sender to the module (from its exec slot). */
int batchio_exec(PyObject *module, lockstep_state *st);

#endif
