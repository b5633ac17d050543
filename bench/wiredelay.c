/*
 * wiredelay: a link with a fixed delay, in user space, for a kernel without sch_netem.
 *
 *     wiredelay FD_A FD_B DELAY_US
 *
 * FD_A and FD_B are two TUN devices (IFF_TUN | IFF_NO_PI, opened by the caller, inherited).
 * Every IP packet read from one is written to the other DELAY_US microseconds later (so a
 * round trip over the link takes 2 * DELAY_US more), in order.  A packet that finds its
 * direction's queue full (QUEUE packets) is dropped and counted.  The waits are ppoll(2)
 * with a 1 ns timer slack, never a busy loop.  On SIGTERM or SIGINT it prints its counts
 * on stderr and exits 0.  Used by bench/tftpbig.py (--link tun --delay-us N).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define QUEUE 4096
#define SLOT 9216                      /* the largest packet: MTU 9000 and some */

struct packet {
    long long due_ns;
    int len;
    unsigned char data[SLOT];
};

struct queue {
    struct packet *p;
    unsigned head, tail;               /* head: next to write; tail: next free */
    long long forwarded, dropped, refused;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Read every packet waiting on `fd` into `q`, each due `delay_ns` from now. */
static void take(int fd, struct queue *q, long long delay_ns)
{
    for (;;) {
        struct packet *slot = &q->p[q->tail % QUEUE];
        unsigned char spill[SLOT];
        int full = q->tail - q->head >= QUEUE;
        ssize_t n = read(fd, full ? spill : slot->data, SLOT);
        if (n <= 0)
            return;                    /* EAGAIN: drained */
        if (full) {
            q->dropped++;
            continue;
        }
        slot->len = (int)n;
        slot->due_ns = now_ns() + delay_ns;
        q->tail++;
    }
}

/* Write the packets of `q` that are due to `fd`; the due time of the next one, or -1. */
static long long give(int fd, struct queue *q)
{
    long long t = now_ns();
    while (q->head != q->tail) {
        struct packet *pk = &q->p[q->head % QUEUE];
        if (pk->due_ns > t)
            return pk->due_ns;
        if (write(fd, pk->data, (size_t)pk->len) == pk->len)
            q->forwarded++;
        else
            q->refused++;              /* the device's queue is full: the packet is lost */
        q->head++;
    }
    return -1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: wiredelay FD_A FD_B DELAY_US\n");
        return 2;
    }
    int fd[2] = {atoi(argv[1]), atoi(argv[2])};
    long delay_us = atol(argv[3]);
    if (fd[0] < 0 || fd[1] < 0 || delay_us < 0 || delay_us > 1000000) {
        fprintf(stderr, "wiredelay: bad arguments (DELAY_US 0..1000000)\n");
        return 2;
    }
    struct queue q[2];                 /* q[0]: read from A, written to B; q[1]: the other way */
    for (int i = 0; i < 2; i++) {
        memset(&q[i], 0, sizeof q[i]);
        q[i].p = malloc(sizeof(struct packet) * QUEUE);
        if (q[i].p == NULL) {
            perror("wiredelay: malloc");
            return 1;
        }
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    fprintf(stdout, "ready\n");
    fflush(stdout);
    const long long delay_ns = delay_us * 1000LL;
    while (!stop) {
        long long next = -1;
        for (int i = 0; i < 2; i++) {
            long long due = give(fd[1 - i], &q[i]);
            if (due >= 0 && (next < 0 || due < next))
                next = due;
        }
        struct pollfd p[2] = {{.fd = fd[0], .events = POLLIN}, {.fd = fd[1], .events = POLLIN}};
        struct timespec ts, *tp = NULL;
        if (next >= 0) {
            long long wait = next - now_ns();
            if (wait < 0)
                wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            tp = &ts;
        }
        int r = ppoll(p, 2, tp, NULL);
        if (r < 0 && errno != EINTR) {
            perror("wiredelay: ppoll");
            return 1;
        }
        for (int i = 0; i < 2; i++)
            if (r > 0 && (p[i].revents & POLLIN))
                take(fd[i], &q[i], delay_ns);
    }
    fprintf(stderr, "wiredelay: a->b forwarded %lld dropped %lld refused %lld; "
            "b->a forwarded %lld dropped %lld refused %lld\n",
            q[0].forwarded, q[0].dropped, q[0].refused, q[1].forwarded, q[1].dropped, q[1].refused);
    return 0;
}
