/*
 * sidusd.net._lockstep, the DATA of one Engine.pump round: the steps it took, sent with one
 * sendmmsg(2) straight from the runs' buffers (a 4-byte header and a pointer per block: no
 * copy).  A step sends its run's window of blocks (one in lockstep); with GSO (`gso` > 1:
 * UDP_SEGMENT, the segment size a block's 4 + blksize) the blocks of a step go as one message
 * of up to `gso` segments (and 65507 bytes), which the kernel cuts into datagrams: the stack
 * is crossed once per window, not once per block.  A message the kernel refuses as GSO (EIO:
 * the device cannot checksum it; EINVAL...) stops the round like a full send buffer: it and
 * what follows go back to Python (`gso_refused`), which switches GSO off for the socket.
 */
#include "_lockstep.h"
#include <errno.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103            /* linux/udp.h */
#endif
#define SEG_SPACE CMSG_SPACE(sizeof(uint16_t))

int
sb_init(struct send_batch *sb, unsigned int cap)
{
    memset(sb, 0, sizeof(*sb));
    sb->cap = cap;
    sb->msgs = PyMem_Calloc(cap, sizeof(struct mmsghdr));
    sb->iov = PyMem_Calloc((size_t)cap * 2, sizeof(struct iovec));
    sb->names = PyMem_Calloc(cap, sizeof(struct sockaddr_in));
    sb->hdr = PyMem_Calloc(cap, 4);
    sb->ctrl = PyMem_Calloc(cap, SEG_SPACE);
    sb->blocks = PyMem_Calloc(cap, sizeof(unsigned int));
    sb->runs = PyMem_Calloc(cap, sizeof(RunObject *));
    if (!sb->msgs || !sb->iov || !sb->names || !sb->hdr || !sb->ctrl || !sb->blocks || !sb->runs)
        return -1;
    for (unsigned int i = 0; i < cap; i++) {
        sb->iov[2 * i].iov_base = sb->hdr[i];
        sb->iov[2 * i].iov_len = 4;
        sb->msgs[i].msg_hdr.msg_name = &sb->names[i];
        sb->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    return 0;
}

void
sb_free(struct send_batch *sb)
{
    PyMem_Free(sb->msgs);
    PyMem_Free(sb->iov);
    PyMem_Free(sb->names);
    PyMem_Free(sb->hdr);
    PyMem_Free(sb->ctrl);
    PyMem_Free(sb->blocks);
    PyMem_Free(sb->runs);
}

/* Segments per message for blocks of `bs` bytes: 1 (GSO off) up to `gso`. */
static inline Py_ssize_t
step_segs(int gso, Py_ssize_t bs)
{
    Py_ssize_t most = GSO_MAX_BYTES / (4 + bs);
    if (most > GSO_MAX_SEGS)
        most = GSO_MAX_SEGS;
    if (most > gso)
        most = gso;
    return most < 1 ? 1 : most;
}

/* Whether the next step of `run` fits in the batch beside what it holds already (its blocks:
 * a message holds one block at least, so the messages fit too). */
int
sb_fits(const struct send_batch *sb, const RunObject *run)
{
    return sb->nb + run_step_blocks(run) <= sb->cap;
}

/* Whether one of the batch's messages is `run`'s (a file run's point into its buffer). */
int
sb_holds(const struct send_batch *sb, const RunObject *run)
{
    for (unsigned int i = 0; i < sb->k; i++)
        if (sb->runs[i] == run)
            return 1;
    return 0;
}

/* Put the next step of `run` for the peer `name` in the batch (it fits: sb_fits; its payloads
 * are ready: run_next_ready or run_read_next); a reference to run is taken per message. */
void
sb_add_step(struct send_batch *sb, RunObject *run, const struct sockaddr_in *name, double now,
            int gso)
{
    Py_ssize_t n = run_step_blocks(run), segs = step_segs(gso, run->blksize);
    unsigned int block = run->ack;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t m = n - i < segs ? n - i : segs;
        struct msghdr *h = &sb->msgs[sb->k].msg_hdr;
        h->msg_iov = &sb->iov[2 * sb->nb];
        h->msg_iovlen = (size_t)(2 * m);
        h->msg_control = NULL;
        h->msg_controllen = 0;
        for (Py_ssize_t j = 0; j < m; j++, i++) {
            const char *p;
            size_t take;
            run_next_payload(run, i, &p, &take);
            block = (block + 1) & 0xFFFF;
            unsigned char *hd = sb->hdr[sb->nb + j];
            hd[0] = 0;
            hd[1] = 3;                          /* DATA */
            hd[2] = (unsigned char)(block >> 8);
            hd[3] = (unsigned char)(block & 0xFF);
            sb->iov[2 * (sb->nb + j) + 1].iov_base = (void *)p;
            sb->iov[2 * (sb->nb + j) + 1].iov_len = take;
        }
        if (m > 1) {                            /* every segment but the last is 4 + blksize */
            h->msg_control = sb->ctrl + (size_t)sb->k * SEG_SPACE;
            h->msg_controllen = SEG_SPACE;
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            uint16_t seg = (uint16_t)(4 + run->blksize);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(seg));
            memcpy(CMSG_DATA(c), &seg, sizeof(seg));
        }
        sb->names[sb->k] = *name;
        sb->runs[sb->k] = (RunObject *)Py_NewRef(run);
        sb->blocks[sb->k] = (unsigned int)m;
        sb->k++;
        sb->nb += (unsigned int)m;
    }
    run->used += n;
    run->ack = block;
    run->at = now;
}

/* Block j of message i as one datagram (header + payload). */
static PyObject *
block_bytes(const struct send_batch *sb, unsigned int i, unsigned int j)
{
    const struct iovec *v = sb->msgs[i].msg_hdr.msg_iov + 2 * j;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 + v[1].iov_len));
    if (b == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(b), v[0].iov_base, 4);
    if (v[1].iov_len)
        memcpy(PyBytes_AS_STRING(b) + 4, v[1].iov_base, v[1].iov_len);
    return b;
}

/* Message i for the caller's outbox: bytes (one block), or a tuple of them (a GSO message). */
static PyObject *
message_payload(const struct send_batch *sb, unsigned int i)
{
    unsigned int m = sb->blocks[i];
    if (m == 1)
        return block_bytes(sb, i, 0);
    PyObject *t = PyTuple_New(m);
    for (unsigned int j = 0; t != NULL && j < m; j++) {
        PyObject *b = block_bytes(sb, i, j);
        if (b == NULL)
            Py_CLEAR(t);
        else
            PyTuple_SET_ITEM(t, j, b);
    }
    return t;
}

static inline int
gso_error(int err)
{
    return err == EIO || err == EINVAL || err == EOPNOTSUPP || err == ENOPROTOOPT || err == EMSGSIZE;
}

/* Send the batch (or, with `sending` false, none of it); what is refused with EAGAIN, refused
 * as GSO, or not sent goes to `unsent` as (payload, peer); with `unsent` NULL (an error path)
 * it is dropped.  The references are released and the batch emptied either way.  Returns -1
 * on a Python error. */
int
sb_send(struct send_batch *sb, int fd, int sending, PyObject *unsent, Py_ssize_t *errors,
        int *blocked, int *gso_refused)
{
    unsigned int off = 0, k = sb->k;
    int rc = 0;
    while (sending && off < k) {
        int m = sendmmsg(fd, sb->msgs + off, k - off, MSG_DONTWAIT);
        if (m > 0) {
            off += (unsigned int)m;
            continue;
        }
        if (m == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ENOBUFS) {
            *blocked = 1;
            break;
        }
        if (sb->blocks[off] > 1 && gso_error(errno)) {
            *gso_refused = *blocked = 1;      /* Python sends it, and all later, without GSO */
            break;
        }
        (*errors)++;                 /* this message is dropped; the transfer's timer recovers */
        off++;
    }
    for (unsigned int i = off; i < k && unsent != NULL && rc == 0; i++) {
        PyObject *p = message_payload(sb, i);
        PyObject *item = p ? PyTuple_Pack(2, p, sb->runs[i]->peer) : NULL;
        Py_XDECREF(p);
        if (item == NULL || PyList_Append(unsent, item) < 0)
            rc = -1;
        Py_XDECREF(item);
    }
    for (unsigned int i = 0; i < k; i++)
        Py_CLEAR(sb->runs[i]);
    sb->k = sb->nb = 0;
    return rc;
}
