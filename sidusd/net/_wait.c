/*
 * sidusd.net._lockstep, the wait of Engine.pump: after it sent the DATA of the steps it took,
 * wait for their ACKs (GIL released) instead of returning to the event loop, for at most as
 * long as the caller allows, and not a moment longer than the event loop has other work: a
 * readable `wake_fd` (the event loop's own epoll descriptor) ends it.
 */
#include "_lockstep.h"
#include <poll.h>
#include <sched.h>
#include <time.h>

#define SPIN_MISSES 32         /* waits in a row that miss their spin stop it; then one in */
#define SPIN_PROBE 8           /* SPIN_PROBE spins again, one in twice as many after each */
#define SPIN_PROBE_MAX 256     /* probe that misses too, down to one in SPIN_PROBE_MAX */

long
us_between(const struct timespec *t0, const struct timespec *t1)
{
    return (t1->tv_sec - t0->tv_sec) * 1000000L + (t1->tv_nsec - t0->tv_nsec) / 1000;
}

long
us_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return us_between(t0, &t1);
}

/* Wait up to `us` microseconds for `fd` to be readable, the GIL released: first by polling
 * it without sleeping for up to `spin_us` (an ACK that comes within it costs no sleep and no
 * wake-up: on a VM a cross-CPU wake-up is tens of microseconds, a lockstep block's whole
 * budget), then by sleeping in ppoll (no millisecond rounding).  Only while spinning pays:
 * after SPIN_MISSES waits in a row readable only long after their spin (4x: a LAN's round
 * trip, a slow client), one in SPIN_PROBE spins, then one in 16, 32... SPIN_PROBE_MAX while
 * those probes miss too (at a 240 us round trip the spin doubled the CPU per GB; on loopback
 * many ACKs come just after 30 us: they must not stop it).  A hit spins on every wait again.  A miss
 * is by the clock from `sent` (when the DATA left), not by who saw the ACK, nor from the wait's
 * start: on a loaded CPU one sched_yield can last a timeslice, or the thread lose the CPU before
 * it waits, and the ACK is there at once -- the peer still took longer than a spin.
 * `wake_fd` (-1: none): readable means the event loop has something else to do; the wait
 * ends at once and WAIT_WOKEN is returned.  1: `fd` is readable; 0: the time is up. */
int
wait_readable(struct spin_policy *sp, int fd, int wake_fd, const struct timespec *sent, long us,
              long spin_us)
{
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
    nfds_t nfds = wake_fd >= 0 ? 2 : 1;
    struct timespec zero = {0, 0}, t0;
    int r = 0, looks = 0;           /* looks: polls that found nothing */
    long took;
    if (sp->probe < SPIN_PROBE)
        sp->probe = SPIN_PROBE;
    if (sp->misses >= SPIN_MISSES && sp->waits % sp->probe != 0)
        spin_us = 0;
    sp->waits++;
    sp->spun += spin_us > 0;
    long spin = spin_us < us ? spin_us : us;    /* the spin this wait has room for */
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (spin > 0)
        while ((r = ppoll(p, nfds, &zero, NULL)) == 0 && us_since(&t0) < spin) {
            looks++;
            sched_yield();          /* a peer on this CPU runs now: its ACK is what we wait for */
        }
    long left = us - us_since(&t0);
    if (r == 0 && left > 0) {
        struct timespec ts = {.tv_sec = left / 1000000, .tv_nsec = (left % 1000000) * 1000};
        r = ppoll(p, nfds, &ts, NULL);
    }
    took = us_since(sent);               /* the peer's turnaround, as far as we can tell */
    Py_END_ALLOW_THREADS
    int readable = r > 0 && (p[0].revents & (POLLIN | POLLERR)) != 0;
    int seen = readable && looks > 0;     /* it came while this wait looked */
    /* A hit: it came within 4x the spin.  A miss: it came later, or this wait ran out after
     * 4x the spin without it.  Neither: a wake-up (says nothing of the peer), a datagram there
     * at the first look (another peer's, at N > 1), a wait that ran out sooner (the call's
     * budget was nearly spent: that said "hit" ~20 times a second to a peer a LAN away, and
     * each one spun the next 32 waits) */
    if (spin_us > 0 && seen && took <= 4 * spin_us) {
        sp->misses = 0;
        sp->probe = SPIN_PROBE;
    } else if (spin_us > 0 && (seen || (r == 0 && took > 4 * spin_us))) {
        if (++sp->misses > SPIN_MISSES && sp->probe < SPIN_PROBE_MAX)
            sp->probe *= 2;                     /* a probe missed */
    }
    if (readable)
        return 1;
    if (r > 0 && nfds == 2 && p[1].revents != 0) {
        sp->woken++;
        return WAIT_WOKEN;
    }
    return 0;
}
