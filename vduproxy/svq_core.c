/*
 * svq_core: shadow virtqueue data path. See svq_core.h for the contract.
 *
 * Trust model: guest memory (rings, descriptors, indirect tables) is written concurrently by a possibly hostile
 * guest, so every value is read once into a local copy and checked before use. Shadow ring memory is written by
 * the device: its used ring is checked the same way, and what each shadow descriptor stands for is kept in
 * private arrays, never read back from shared memory.
 */
#define _GNU_SOURCE
#include "svq_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little endian and this core reads them natively"
#endif

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define DESC_SIZE 16u
#define NO_DESC UINT32_MAX
#define CTL_TOKEN UINT64_MAX
#define LOG_PAGE_SHIFT 12
#define GUEST_FLAGS                                                                                              \
    (SVQ_F_EVENT_IDX | SVQ_F_INDIRECT | SVQ_F_MRG_RXBUF | SVQ_F_RX | SVQ_F_LOG | SVQ_F_NET_HDR_12 |               \
     SVQ_F_LEARN_MAC)
#define DEV_FLAGS (SVQ_DEV_EVENT_IDX | SVQ_DEV_INDIRECT | SVQ_DEV_MRG_RXBUF | SVQ_DEV_NO_MRG_RXBUF)
#define NUM_BUFFERS_OFF 10 /* virtio_net_hdr_v1.num_buffers */
#define NET_HDR_V1_LEN 12

struct vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct vdesc) == DESC_SIZE, "split ring descriptor is 16 bytes");

struct used_elem {
    uint32_t id;
    uint32_t len;
};

/* The guest's ring: the core plays the device toward it. */
struct gring {
    uint32_t num;
    uint8_t *desc, *avail, *used;
    uint64_t desc_gpa, avail_gpa, used_gpa, log_used_gpa;
    uint16_t last_avail, used_idx;
    int kick_fd, call_fd;
    bool call_is_efd;
    uint32_t flags;
};

/* What one shadow descriptor stands for, kept privately so a device scribbling on the table cannot mislead. */
struct sdesc {
    uint64_t gpa;
    uint32_t len;
    uint16_t flags; /* DESC_F_WRITE or DESC_F_INDIRECT (a passed-through guest table) */
};

struct shead {
    uint64_t wlen;       /* writable bytes of the whole chain: the most a used length may claim */
    uint32_t ndesc;
    uint16_t guest_head;
    uint16_t avail_pos;  /* shadow avail index this chain was published at */
    bool in_use;
    bool injected;       /* a proxy frame (svq_inject_tx): completed inside the core, never toward the guest */
    uint8_t slot;        /* its inject-area slot */
};

/* The shadow ring: the core plays the driver toward the device. */
struct sring {
    uint32_t num;
    uint8_t *desc, *avail, *used;
    uint16_t avail_idx, last_used;
    int kick_fd, call_fd;
    bool kick_is_efd;
    uint32_t flags;
    uint32_t free_head, nfree, inflight;
    uint32_t *next; /* free list and chain links */
    struct sdesc *sd;
    struct shead *hd;
};

struct vq {
    struct gring g;
    struct sring sh;
    bool has_guest, has_shadow;
    uint32_t broken;             /* atomic: 0 -> 1 once, by vq_fail; back to 0 only by detach */
    pthread_mutex_t info_lock; /* `reason` and `mac`: written by the thread and API calls, read by API calls */
    char reason[SVQ_REASON_LEN];
    uint8_t mac[6];              /* the latest unicast source MAC of the guest's TX frames */
    bool mac_valid;
    uint32_t mac_countdown;      /* TX chains until the next look at the source MAC (once one is known) */
    bool quiet;                  /* non-EVENT_IDX sides: NO_NOTIFY / NO_INTERRUPT currently set by the core */
    bool stalled;                /* the shadow ring had no room for the next guest chain: wait for the device */
    struct svq_stats st; /* counters: atomic adds by whoever processes, atomic loads by readers */
};

struct svq {
    uint32_t nvqs;
    int error_efd, ctl_efd, epfd;
    bool running;
    uint32_t busy_poll_us;
    struct svq_thread_stats tst; /* written by the thread (relaxed atomic adds), read by svq_get_thread_stats */
    pthread_t thread;
    bool has_thread;            /* created by the first start, joined by svq_free; parked in between runs */
    pthread_mutex_t park_lock;  /* run_gen, parked, exit_thread */
    pthread_cond_t park_cv;
    uint64_t run_gen;
    bool parked;
    bool exit_thread;
    pthread_mutex_t lock; /* serialises API calls; the data-path thread never takes it */
    struct svq_region *regions;
    uint32_t nregions;
    bool identity; /* every region has iova == gpa: guest indirect tables are valid as the device reads them */
    uint32_t last_region; /* region_of's guess: consecutive buffers nearly always share a region */
    uint8_t *log;
    uint64_t log_size;
    uint8_t *inj_local; /* inject area: SVQ_INJECT_SLOT-byte slots, inj_mask marks those in flight */
    uint64_t inj_iova;
    uint32_t inj_slots;
    uint64_t inj_mask;
    bool stop;          /* atomic: asks the thread to return (with a ctl_efd write to wake it) */
    struct vq *vqs;
};

/* ---- small helpers --------------------------------------------------------------------------------------- */

/* Ring indices are shared with another agent: single atomic accesses (callers checked the 2-byte alignment). */
static inline uint16_t ld16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED);
}
static inline uint16_t ld16_acq(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE);
}
static inline void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED); }
static inline void st16_rel(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
}
static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void stat_add(uint64_t *c, uint64_t v) { if (v) __atomic_fetch_add(c, v, __ATOMIC_RELAXED); }
static inline bool is_pow2(uint32_t n) { return n && !(n & (n - 1)); }

/* virtio's vring_need_event: was event_idx crossed when the index moved from old to new? */
static inline bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static bool is_broken(const struct vq *q) { return __atomic_load_n(&q->broken, __ATOMIC_ACQUIRE) != 0; }

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* a full or closed error fd must not stop the data path; the broken flag is still readable */
    }
}

static void set_reason_v(struct vq *q, const char *fmt, va_list ap)
{
    pthread_mutex_lock(&q->info_lock);
    vsnprintf(q->reason, sizeof(q->reason), fmt, ap);
    pthread_mutex_unlock(&q->info_lock);
}

__attribute__((format(printf, 2, 3))) static void set_reason(struct vq *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_reason_v(q, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 3, 4))) static int vq_fail(svq_t *s, struct vq *q, const char *fmt, ...)
{
    if (is_broken(q))
        return -EIO;
    va_list ap;
    va_start(ap, fmt);
    set_reason_v(q, fmt, ap);
    va_end(ap);
    stat_add(&q->st.faults, 1);
    __atomic_store_n(&q->broken, 1, __ATOMIC_RELEASE);
    signal_fd(s->error_efd);
    return -EIO;
}

static bool fd_is_eventfd(int fd)
{
    char path[64], target[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof(target) - 1);
    if (n < 0)
        return false;
    target[n] = '\0';
    return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static int dup_fd(int fd, int *out)
{
    if (fd < 0) {
        *out = -1;
        return 0;
    }
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (d < 0)
        return -errno;
    *out = d;
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* A SIGPIPE raised by a write in a thread that blocks it stays pending; take it so it never fires later. */
static void consume_sigpipe(void)
{
    sigset_t pending, pipe_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE)) {
        struct timespec zero = {0, 0};
        sigtimedwait(&pipe_set, NULL, &zero);
    }
}

/*
 * Write one event. Eventfds never block on a write of 1; anything else (a pipe, a socket) is checked for room
 * first so a peer that stops reading cannot stall the thread. Returns 1 sent, 0 skipped, -errno on failure.
 */
static int notify_fd(int fd, bool is_efd)
{
    if (fd < 0)
        return 0;
    if (!is_efd) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int rc = poll(&p, 1, 0);
        if (rc < 0)
            return errno == EINTR ? 0 : -errno;
        if (p.revents & POLLNVAL)
            return -EBADF;
        if (!(p.revents & (POLLOUT | POLLERR | POLLHUP)))
            return 0;
    }
    uint64_t one = 1;
    ssize_t w = write(fd, &one, sizeof(one));
    if (w == (ssize_t)sizeof(one))
        return 1;
    if (w >= 0)
        return -EIO;
    int e = errno;
    if (e == EAGAIN || e == EINTR)
        return 0;
    if (e == EPIPE)
        consume_sigpipe();
    return -e;
}

/* Read one pending event. Returns 1 read, 0 nothing, -errno (or -EPIPE on end of file). */
static int drain_fd(int fd)
{
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof(v));
    if (n > 0)
        return 1;
    if (n == 0)
        return -EPIPE;
    return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
}

/* ---- guest memory ---------------------------------------------------------------------------------------- */

/* Only the processing context (the thread, or an API call with the thread paused) calls this: it owns the guess. */
static const struct svq_region *region_of(svq_t *s, uint64_t gpa)
{
    if (s->last_region < s->nregions) {
        const struct svq_region *r = &s->regions[s->last_region];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    for (uint32_t i = 0; i < s->nregions; i++) {
        const struct svq_region *r = &s->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            s->last_region = i;
            return r;
        }
    }
    return NULL;
}

/* Local pointer to [gpa, gpa+len) when it lies inside one region (the core reads and writes through it). */
static uint8_t *gpa_local(svq_t *s, uint64_t gpa, uint64_t len)
{
    const struct svq_region *r = region_of(s, gpa);
    if (!r || len > r->size - (gpa - r->gpa))
        return NULL;
    return (uint8_t *)(uintptr_t)(r->local + (gpa - r->gpa));
}

/*
 * IOVA of [gpa, gpa+len). The device only needs the range contiguous in IOVA, so a buffer may run across
 * regions that are adjacent in both GPA and IOVA; anything else is outside guest memory.
 */
static bool gpa_iova_slow(svq_t *s, uint64_t gpa, uint64_t len, uint64_t *iova)
{
    const struct svq_region *r = region_of(s, gpa);
    if (!r)
        return false;
    *iova = r->iova + (gpa - r->gpa);
    uint64_t room = r->size - (gpa - r->gpa);
    for (uint32_t hops = 0; len > room; hops++) {
        uint64_t end_gpa = r->gpa + r->size, end_iova = r->iova + r->size;
        const struct svq_region *n = region_of(s, end_gpa);
        if (!n || hops >= s->nregions || n->gpa != end_gpa || n->iova != end_iova)
            return false;
        len -= room;
        r = n;
        room = r->size;
    }
    return true;
}

/* The per-buffer case: the whole buffer inside the region the previous one was in. */
static inline bool gpa_iova(svq_t *s, uint64_t gpa, uint64_t len, uint64_t *iova)
{
    if (s->last_region < s->nregions) {
        const struct svq_region *r = &s->regions[s->last_region];
        uint64_t off = gpa - r->gpa;
        if (gpa >= r->gpa && off < r->size && len <= r->size - off) {
            *iova = r->iova + off;
            return true;
        }
    }
    return gpa_iova_slow(s, gpa, len, iova);
}

/* ---- dirty log ------------------------------------------------------------------------------------------- */

static bool logging(const struct vq *q) { return (q->g.flags & SVQ_F_LOG) != 0; }

static int log_range(svq_t *s, struct vq *q, uint64_t gpa, uint64_t len)
{
    if (!len)
        return 0;
    if (!s->log)
        return vq_fail(s, q, "dirty logging is on but no log is set");
    if (gpa > UINT64_MAX - (len - 1))
        return vq_fail(s, q, "dirty range 0x%llx+0x%llx wraps", (unsigned long long)gpa, (unsigned long long)len);
    uint64_t first = gpa >> LOG_PAGE_SHIFT, last = (gpa + len - 1) >> LOG_PAGE_SHIFT;
    if ((last >> 3) >= s->log_size)
        return vq_fail(s, q, "dirty log of %llu bytes too small for gpa 0x%llx", (unsigned long long)s->log_size,
                       (unsigned long long)(gpa + len - 1));
    uint64_t newly = 0;
    for (uint64_t p = first; p <= last;) {
        uint64_t byte = p >> 3;
        unsigned lo = (unsigned)(p & 7), hi = (last >> 3) == byte ? (unsigned)(last & 7) : 7u;
        uint8_t mask = (uint8_t)(((2u << hi) - 1u) & ~((1u << lo) - 1u));
        /* Recycled buffers hit bits already set (until the front-end's next sync): a plain load skips the locked
         * RMW then. Seeing the bit set after the write is enough — the sync that clears it copies the page
         * afterwards — provided the write is visible before this load: the device's is (its used index was read
         * with acquire), the core's own stores need a full fence first (log_written). */
        if ((__atomic_load_n(&s->log[byte], __ATOMIC_RELAXED) & mask) != mask) {
            uint8_t old = __atomic_fetch_or(&s->log[byte], mask, __ATOMIC_RELAXED);
            newly += (uint64_t)__builtin_popcount((unsigned)(mask & (uint8_t)~old));
        }
        p = (byte + 1) << 3;
    }
    stat_add(&q->st.dirty_pages, newly);
    return 0;
}

/* Log what the core itself just stored into guest memory: its store must be visible before log_range tests the
 * bit (a store may still sit in the store buffer when a later load runs, even on x86). Always after the store:
 * a bit set before it could be cleared by a sync that copies the page before the store lands. */
static int log_written(svq_t *s, struct vq *q, uint64_t gpa, uint64_t len)
{
    full_fence();
    return log_range(s, q, gpa, len);
}

/* Log the writable buffers of a guest indirect table the device wrote through, up to *left bytes. */
static int log_indirect(svq_t *s, struct vq *q, const struct sdesc *e, uint64_t *left)
{
    const uint8_t *tab = gpa_local(s, e->gpa, e->len);
    uint32_t n = e->len / DESC_SIZE;
    if (!tab)
        return vq_fail(s, q, "indirect table 0x%llx left guest memory while in flight",
                       (unsigned long long)e->gpa);
    for (uint32_t i = 0, hops = 0; *left;) {
        struct vdesc d;
        if (++hops > n)
            return vq_fail(s, q, "indirect table 0x%llx changed into a loop while in flight",
                           (unsigned long long)e->gpa);
        memcpy(&d, tab + (size_t)i * DESC_SIZE, sizeof(d));
        if (d.flags & DESC_F_WRITE) {
            uint64_t w = d.len < *left ? d.len : *left;
            if (log_range(s, q, d.addr, w))
                return -EIO;
            *left -= w;
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        i = d.next;
        if (i >= n)
            return vq_fail(s, q, "indirect table 0x%llx changed while in flight", (unsigned long long)e->gpa);
    }
    return 0;
}

/* Log what the device may have written into a chain: writable buffers in order, up to len bytes. */
static int log_chain(svq_t *s, struct vq *q, uint32_t head, uint64_t len)
{
    struct sring *r = &q->sh;
    uint32_t id = head;
    for (uint32_t k = 0; k < r->hd[head].ndesc && len; k++, id = r->next[id]) {
        const struct sdesc *e = &r->sd[id];
        if (e->flags & DESC_F_INDIRECT) {
            if (log_indirect(s, q, e, &len))
                return -EIO;
        } else if (e->flags & DESC_F_WRITE) {
            uint64_t w = e->len < len ? e->len : len;
            if (log_range(s, q, e->gpa, w))
                return -EIO;
            len -= w;
        }
    }
    return 0;
}

/* ---- reading and writing inside a chain ------------------------------------------------------------------- */

/* Copy between buf and guest memory at [gpa, gpa+len), which may run across regions. False: not all of it is
 * guest memory (nothing is known about how much was copied). */
static bool guest_rw(svq_t *s, uint64_t gpa, uint8_t *buf, uint32_t len, bool store)
{
    while (len) {
        const struct svq_region *r = region_of(s, gpa);
        if (!r)
            return false;
        uint64_t room = r->size - (gpa - r->gpa);
        uint32_t n = len < room ? len : (uint32_t)room;
        uint8_t *p = (uint8_t *)(uintptr_t)(r->local + (gpa - r->gpa));
        if (store)
            memcpy(p, buf, n);
        else
            memcpy(buf, p, n);
        gpa += n; /* cannot wrap: set_regions refused regions that end past UINT64_MAX */
        buf += n;
        len -= n;
    }
    return true;
}

/* A window [off, off+len) of a chain's readable or writable bytes, moved to or from buf. */
struct cursor {
    uint64_t off;
    uint8_t *buf;
    uint32_t len, done;
    bool store, bad;
};

static void cursor_seg(svq_t *s, struct cursor *c, uint64_t gpa, uint32_t len)
{
    if (c->off >= len) {
        c->off -= len;
        return;
    }
    uint32_t take = len - (uint32_t)c->off;
    if (take > c->len - c->done)
        take = c->len - c->done;
    if (gpa > UINT64_MAX - c->off || !guest_rw(s, gpa + c->off, c->buf + c->done, take, c->store)) {
        c->bad = true;
        return;
    }
    c->done += take;
    c->off = 0;
}

/* A guest indirect table the device reads directly: the guest may have rewritten it, so check as we walk. */
static void cursor_table(svq_t *s, struct cursor *c, const struct sdesc *e, uint16_t dir)
{
    const uint8_t *tab = gpa_local(s, e->gpa, e->len);
    uint32_t n = e->len / DESC_SIZE;
    if (!tab) {
        c->bad = true;
        return;
    }
    for (uint32_t i = 0, hops = 0; c->done < c->len && !c->bad;) {
        struct vdesc d;
        if (++hops > n) {
            c->bad = true;
            return;
        }
        memcpy(&d, tab + (size_t)i * DESC_SIZE, sizeof(d));
        if ((d.flags & DESC_F_WRITE) == dir)
            cursor_seg(s, c, d.addr, d.len);
        if (!(d.flags & DESC_F_NEXT))
            return;
        i = d.next;
        if (i >= n) {
            c->bad = true;
            return;
        }
    }
}

/*
 * Move len bytes at offset off of the chain's writable (dir = DESC_F_WRITE) or readable (dir = 0) bytes.
 * Returns how many were moved: fewer when the chain is shorter, or when the guest made part of it unreachable
 * (an indirect table rewritten while in flight), which the callers treat as "not there".
 */
static uint32_t chain_rw(svq_t *s, struct vq *q, uint32_t head, uint16_t dir, uint64_t off, uint8_t *buf,
                         uint32_t len, bool store)
{
    struct sring *r = &q->sh;
    struct cursor c = {.off = off, .buf = buf, .len = len, .store = store};
    uint32_t id = head;
    for (uint32_t k = 0; k < r->hd[head].ndesc && c.done < len && !c.bad; k++, id = r->next[id]) {
        const struct sdesc *e = &r->sd[id];
        if (e->flags & DESC_F_INDIRECT)
            cursor_table(s, &c, e, dir);
        else if ((e->flags & DESC_F_WRITE) == dir)
            cursor_seg(s, &c, e->gpa, e->len);
    }
    return c.bad ? 0 : c.done;
}

/*
 * The source MAC of a guest TX frame (bytes 6..11 after the virtio-net header). The latest one wins, not the
 * first: a guest that changes its address (ip link set address, a bonding failover) receives on the new one,
 * and that is the address the device filter and the RARP must carry. Multicast and zero sources are not
 * addresses a NIC receives on, so they are ignored.
 */
static void learn_mac(svq_t *s, struct vq *q, uint32_t sh_head)
{
    uint32_t hdr = (q->g.flags & SVQ_F_NET_HDR_12) ? NET_HDR_V1_LEN : 10;
    uint8_t eth[12];
    q->mac_countdown = SVQ_MAC_SAMPLE;
    if (chain_rw(s, q, sh_head, 0, hdr, eth, sizeof(eth), false) != sizeof(eth))
        return;
    const uint8_t *src = eth + 6;
    static const uint8_t zero[6];
    if ((src[0] & 1) || !memcmp(src, zero, 6) || (q->mac_valid && !memcmp(q->mac, src, 6)))
        return;
    pthread_mutex_lock(&q->info_lock);
    memcpy(q->mac, src, 6);
    q->mac_valid = true;
    pthread_mutex_unlock(&q->info_lock);
    stat_add(&q->st.mac_changes, 1);
}

/*
 * num_buffers across a MRG_RXBUF mismatch, on a completed RX chain the device wrote len bytes into. Guest with
 * MRG_RXBUF, device without: every packet is one buffer, and the guest must read num_buffers = 1 (the device
 * left the field as it pleased). Device with it, guest without: a packet spread over several buffers cannot be
 * handed to this guest at all. The written field lies inside the first len bytes, so put_used logs its page.
 */
static int bridge_num_buffers(svq_t *s, struct vq *q, uint32_t sh_head, uint32_t len)
{
    bool guest_mrg = q->g.flags & SVQ_F_MRG_RXBUF; /* called only where the device's differs */
    if (len < NET_HDR_V1_LEN)
        return 0;
    uint8_t v[2] = {1, 0};
    if (chain_rw(s, q, sh_head, DESC_F_WRITE, NUM_BUFFERS_OFF, v, 2, guest_mrg) != 2)
        return vq_fail(s, q, "RX chain %u became unreachable while in flight", q->sh.hd[sh_head].guest_head);
    uint16_t n = (uint16_t)(v[0] | v[1] << 8);
    if (!guest_mrg && n > 1)
        return vq_fail(s, q, "device used %u buffers for one packet but the guest did not negotiate MRG_RXBUF", n);
    return 0;
}

/* ---- guest -> shadow ------------------------------------------------------------------------------------- */

struct chain {
    uint32_t first, ndesc;
    uint64_t wlen;
    uint32_t pend_id; /* last emitted descriptor: written once its successor is known */
    struct vdesc pend;
};

static void sh_free_chain(struct sring *r, uint32_t head, uint32_t n)
{
    uint32_t id = head;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t nxt = r->next[id];
        r->next[id] = r->free_head;
        r->free_head = id;
        r->nfree++;
        id = nxt;
    }
}

/* Append one shadow descriptor. Returns 0, or 1 when the shadow ring has no free descriptor right now. */
static int emit(struct sring *r, struct chain *c, uint64_t gpa, uint32_t len, uint16_t flags, uint64_t iova)
{
    if (!r->nfree)
        return 1;
    uint32_t id = r->free_head;
    r->free_head = r->next[id];
    r->nfree--;
    r->sd[id] = (struct sdesc){.gpa = gpa, .len = len, .flags = flags};
    if (c->pend_id == NO_DESC) {
        c->first = id;
    } else {
        c->pend.flags |= DESC_F_NEXT;
        c->pend.next = (uint16_t)id;
        r->next[c->pend_id] = id;
        memcpy(r->desc + (size_t)c->pend_id * DESC_SIZE, &c->pend, sizeof(c->pend));
    }
    c->pend_id = id;
    c->pend = (struct vdesc){.addr = iova, .len = len, .flags = flags, .next = 0};
    c->ndesc++;
    return 0;
}

/* Check one guest buffer and, with emit_it, append it. Returns 0, 1 (no room) or -EIO. */
static int add_buf(svq_t *s, struct vq *q, struct chain *c, const struct vdesc *d, bool emit_it)
{
    uint64_t iova;
    if (d->addr > UINT64_MAX - d->len)
        return vq_fail(s, q, "buffer 0x%llx+%u wraps around", (unsigned long long)d->addr, d->len);
    if (!gpa_iova(s, d->addr, d->len ? d->len : 1, &iova))
        return vq_fail(s, q, "buffer 0x%llx+%u is outside guest memory", (unsigned long long)d->addr, d->len);
    uint16_t w = d->flags & DESC_F_WRITE;
    if (w)
        c->wlen += d->len;
    if (!emit_it)
        return 0;
    if (c->ndesc >= q->sh.num)
        return vq_fail(s, q, "chain needs more than the %u descriptors of the shadow ring", q->sh.num);
    return emit(&q->sh, c, d->addr, d->len, w, iova);
}

static int add_indirect(svq_t *s, struct vq *q, struct chain *c, const struct vdesc *d)
{
    if (!(q->g.flags & SVQ_F_INDIRECT))
        return vq_fail(s, q, "indirect descriptor but INDIRECT_DESC was not negotiated");
    if (d->flags & DESC_F_NEXT)
        return vq_fail(s, q, "descriptor has both INDIRECT and NEXT");
    if (!d->len || d->len % DESC_SIZE)
        return vq_fail(s, q, "indirect table length %u is not a non-zero multiple of 16", d->len);
    uint32_t n = d->len / DESC_SIZE;
    if (n > SVQ_MAX_RING)
        return vq_fail(s, q, "indirect table of %u entries is longer than %u", n, SVQ_MAX_RING);
    const uint8_t *tab = gpa_local(s, d->addr, d->len);
    if (!tab)
        return vq_fail(s, q, "indirect table 0x%llx+%u is outside guest memory", (unsigned long long)d->addr,
                       d->len);
    /* Passing the table needs its GPAs to be valid IOVAs and the descriptor to start the shadow chain. */
    bool pass = (q->sh.flags & SVQ_DEV_INDIRECT) && s->identity && c->ndesc == 0;
    for (uint32_t i = 0, hops = 0;;) {
        struct vdesc e;
        if (++hops > n)
            return vq_fail(s, q, "indirect table 0x%llx loops", (unsigned long long)d->addr);
        memcpy(&e, tab + (size_t)i * DESC_SIZE, sizeof(e));
        if (e.flags & DESC_F_INDIRECT)
            return vq_fail(s, q, "indirect descriptor inside an indirect table");
        int rc = add_buf(s, q, c, &e, !pass);
        if (rc)
            return rc;
        if (!(e.flags & DESC_F_NEXT))
            break;
        i = e.next;
        if (i >= n)
            return vq_fail(s, q, "indirect next %u beyond a table of %u entries", i, n);
    }
    if (!pass)
        return 0;
    uint64_t iova;
    if (!gpa_iova(s, d->addr, d->len, &iova))
        return vq_fail(s, q, "indirect table 0x%llx has no IOVA", (unsigned long long)d->addr);
    return emit(&q->sh, c, d->addr, d->len, DESC_F_INDIRECT, iova);
}

/* Forward the guest chain at `head`. Returns 0 (shadow head in *out), 1 (no room yet) or -EIO (vq broken). */
static int forward_chain(svq_t *s, struct vq *q, uint32_t head, uint32_t *out)
{
    struct gring *g = &q->g;
    struct chain c = {.first = NO_DESC, .pend_id = NO_DESC};
    int rc = 0;
    if (head >= g->num) {
        rc = vq_fail(s, q, "avail ring head %u is not below ring size %u", head, g->num);
        goto undo;
    }
    for (uint32_t idx = head, hops = 0;;) {
        struct vdesc d;
        if (++hops > g->num) {
            rc = vq_fail(s, q, "chain from head %u loops or is longer than ring size %u", head, g->num);
            goto undo;
        }
        memcpy(&d, g->desc + (size_t)idx * DESC_SIZE, sizeof(d));
        rc = (d.flags & DESC_F_INDIRECT) ? add_indirect(s, q, &c, &d) : add_buf(s, q, &c, &d, true);
        if (rc)
            goto undo;
        if (!(d.flags & DESC_F_NEXT))
            break;
        idx = d.next;
        if (idx >= g->num) {
            rc = vq_fail(s, q, "descriptor next %u is not below ring size %u", idx, g->num);
            goto undo;
        }
    }
    if (c.pend_id == NO_DESC) {
        rc = vq_fail(s, q, "empty chain at head %u", head);
        goto undo;
    }
    memcpy(q->sh.desc + (size_t)c.pend_id * DESC_SIZE, &c.pend, sizeof(c.pend));
    q->sh.hd[c.first] =
        (struct shead){.wlen = c.wlen, .ndesc = c.ndesc, .guest_head = (uint16_t)head, .in_use = true};
    *out = c.first;
    return 0;
undo:
    if (c.ndesc)
        sh_free_chain(&q->sh, c.first, c.ndesc);
    return rc;
}

static int kick_device(svq_t *s, struct vq *q, uint16_t old_avail)
{
    struct sring *r = &q->sh;
    full_fence(); /* the avail idx store must be visible before we read the device's suppression state */
    bool need = (r->flags & SVQ_DEV_EVENT_IDX)
                    ? need_event(ld16(r->used + 4 + 8 * (size_t)r->num), r->avail_idx, old_avail)
                    : !(ld16(r->used) & USED_F_NO_NOTIFY);
    if (!need)
        return 0;
    int rc = notify_fd(r->kick_fd, r->kick_is_efd);
    if (rc < 0)
        return vq_fail(s, q, "device kick fd: %s", strerror(-rc));
    stat_add(&q->st.dev_kicks, (uint64_t)rc);
    return 0;
}

/* Offer one prepared shadow chain to the device (published with the batch's avail idx store). */
static inline void offer(struct sring *r, uint32_t sh_head)
{
    st16(r->avail + 4 + 2 * (size_t)(r->avail_idx & (r->num - 1)), (uint16_t)sh_head);
    r->hd[sh_head].avail_pos = r->avail_idx;
    r->avail_idx++;
    r->inflight++;
}

static uint32_t process_avail(svq_t *s, struct vq *q, bool *more)
{
    struct gring *g = &q->g;
    struct sring *r = &q->sh;
    uint16_t old_avail = r->avail_idx;
    uint32_t budget = g->num;
    bool learn = g->flags & SVQ_F_LEARN_MAC;
    const uint8_t *ring = g->avail + 4;
    uint32_t mask = g->num - 1;
    for (uint16_t avail_idx = ld16_acq(g->avail + 2);; avail_idx = ld16_acq(g->avail + 2)) {
        uint16_t n = (uint16_t)(avail_idx - g->last_avail);
        if (n > g->num) {
            vq_fail(s, q, "guest avail idx %u is %u entries ahead of %u (ring size %u)", avail_idx, n,
                    g->last_avail, g->num);
            return 0;
        }
        if (!n)
            break;
        if (n > budget) {
            n = (uint16_t)budget;
            *more = true; /* the caller comes back without sleeping */
        }
        for (uint16_t k = 0; k < n; k++) {
            uint32_t head = ld16(ring + 2 * (size_t)(g->last_avail & mask));
            uint32_t sh_head = 0;
            int rc = forward_chain(s, q, head, &sh_head);
            if (rc < 0)
                return 0; /* the vq is broken: what this round prepared stays unpublished */
            if (rc > 0) {
                q->stalled = true; /* the device's used entries will free descriptors and wake us */
                goto publish;
            }
            if (learn && (!q->mac_valid || --q->mac_countdown == 0))
                learn_mac(s, q, sh_head);
            offer(r, sh_head);
            g->last_avail++;
        }
        budget -= n;
        if (!budget)
            break;
    }
publish:;
    uint32_t moved = (uint16_t)(r->avail_idx - old_avail);
    if (moved) {
        st16_rel(r->avail + 2, r->avail_idx);
        kick_device(s, q, old_avail);
    }
    return moved;
}

/* ---- shadow -> guest ------------------------------------------------------------------------------------- */

static int call_guest(svq_t *s, struct vq *q, uint16_t old_used)
{
    struct gring *g = &q->g;
    full_fence(); /* the used idx store must be visible before we read the guest's suppression state */
    bool need = (g->flags & SVQ_F_EVENT_IDX)
                    ? need_event(ld16(g->avail + 4 + 2 * (size_t)g->num), g->used_idx, old_used)
                    : !(ld16(g->avail) & AVAIL_F_NO_INTERRUPT);
    if (!need)
        return 0;
    int rc = notify_fd(g->call_fd, g->call_is_efd);
    if (rc < 0)
        return vq_fail(s, q, "guest call fd: %s", strerror(-rc));
    stat_add(&q->st.guest_calls, (uint64_t)rc);
    return 0;
}

/* Give a shadow chain's descriptors back (and its inject slot, for a proxy frame). */
static void release_chain(svq_t *s, struct sring *r, uint32_t sh_head)
{
    struct shead *h = &r->hd[sh_head];
    sh_free_chain(r, sh_head, h->ndesc);
    if (h->injected)
        s->inj_mask &= ~(1ull << h->slot);
    h->in_use = false;
    h->injected = false;
    r->inflight--;
}

/* Write one guest used entry (logging the buffers the device wrote; the entry itself is logged with the batch by
 * publish_used). The slot index is masked, so it is always inside the ring. */
static int put_used(svq_t *s, struct vq *q, uint32_t sh_head, uint32_t len)
{
    struct gring *g = &q->g;
    struct sring *r = &q->sh;
    uint32_t slot = g->used_idx & (g->num - 1);
    struct used_elem e = {.id = r->hd[sh_head].guest_head, .len = len};
    if (logging(q) && log_chain(s, q, sh_head, len))
        return -EIO;
    memcpy(g->used + 4 + 8 * (size_t)slot, &e, sizeof(e));
    release_chain(s, r, sh_head);
    g->used_idx++;
    return 0;
}

/* Log the used entries [old_used, used_idx) — one or two ranges as the ring wraps, the whole ring when a batch
 * is longer than the guest ring (a shadow ring may be larger) — and the index, after their stores. */
static int log_used_batch(svq_t *s, struct vq *q, uint16_t old_used)
{
    struct gring *g = &q->g;
    uint32_t n = (uint16_t)(g->used_idx - old_used), first = old_used & (g->num - 1);
    if (n >= g->num) {
        first = 0;
        n = g->num;
    }
    uint32_t run = n < g->num - first ? n : g->num - first;
    full_fence(); /* the entries and the index are the core's own stores: see log_written */
    if (log_range(s, q, g->log_used_gpa + 4 + 8 * (uint64_t)first, 8 * (uint64_t)run))
        return -EIO;
    if (n > run && log_range(s, q, g->log_used_gpa + 4, 8 * (uint64_t)(n - run)))
        return -EIO;
    return log_range(s, q, g->log_used_gpa + 2, 2);
}

/* Publish the guest used index (a release store), log what the batch wrote, then decide on the guest call. */
static int publish_used(svq_t *s, struct vq *q, uint16_t old_used)
{
    struct gring *g = &q->g;
    if (g->used_idx == old_used)
        return 0;
    st16_rel(g->used + 2, g->used_idx);
    if (logging(q) && log_used_batch(s, q, old_used))
        return -EIO;
    return call_guest(s, q, old_used);
}

static uint32_t process_used(svq_t *s, struct vq *q)
{
    struct gring *g = &q->g;
    struct sring *r = &q->sh;
    uint16_t old_used = g->used_idx, old_last = r->last_used;
    uint64_t bytes = 0;
    /* Only where the caller said the two sides differ (see svq_core.h). */
    bool rx_fix = (g->flags & SVQ_F_RX) && ((g->flags & SVQ_F_MRG_RXBUF) ? (r->flags & SVQ_DEV_NO_MRG_RXBUF)
                                                                        : (r->flags & SVQ_DEV_MRG_RXBUF));
    const uint8_t *ring = r->used + 4;
    uint32_t mask = r->num - 1;
    /* Each entry taken lowers inflight and an index ahead of inflight breaks the vq, so this loop is bounded. */
    for (uint16_t used_idx = ld16_acq(r->used + 2);; used_idx = ld16_acq(r->used + 2)) {
        uint16_t n = (uint16_t)(used_idx - r->last_used);
        if (!n)
            break;
        if (n > r->inflight) {
            vq_fail(s, q, "device used idx %u is %u ahead of %u with %u chains in flight", used_idx, n,
                    r->last_used, r->inflight);
            goto out;
        }
        for (; n; n--) {
            struct used_elem e;
            memcpy(&e, ring + 8 * (size_t)(r->last_used & mask), sizeof(e));
            if (e.id >= r->num || !r->hd[e.id].in_use) {
                vq_fail(s, q, "device used id %u is not a chain in flight", e.id);
                goto out;
            }
            if (r->hd[e.id].injected) {
                release_chain(s, r, e.id);
                stat_add(&q->st.injected, 1);
                r->last_used++;
                continue;
            }
            if (e.len > r->hd[e.id].wlen) {
                e.len = (uint32_t)r->hd[e.id].wlen; /* never let the guest believe more than its buffers hold */
                stat_add(&q->st.clamped, 1);
            }
            if (rx_fix && bridge_num_buffers(s, q, e.id, e.len))
                goto out;
            if (rx_fix && logging(q))
                full_fence(); /* num_buffers is the core's own store, logged with the chain: see log_written */
            if (put_used(s, q, e.id, e.len))
                goto out;
            r->last_used++;
            bytes += e.len;
        }
    }
out:
    if (r->last_used != old_last)
        q->stalled = false;
    uint16_t to_guest = (uint16_t)(g->used_idx - old_used);
    if (to_guest && !is_broken(q) && !publish_used(s, q, old_used)) {
        stat_add(&q->st.packets, to_guest);
        stat_add(&q->st.bytes, bytes);
    }
    return (uint16_t)(r->last_used - old_last);
}

/* ---- notification suppression ---------------------------------------------------------------------------- */

/*
 * While the core is busy (it will look at the rings again without being told), neither side needs to notify
 * it: with EVENT_IDX the event indexes the core published last stay behind, so each side notifies once when
 * it crosses them and then stays quiet; without, the core sets used->flags NO_NOTIFY toward the guest and
 * avail->flags NO_INTERRUPT toward the device. Before sleeping, arm_vq asks for notifications again and looks
 * once more after a full barrier, so an entry published in between is never missed.
 */
static int quiet_vq(svq_t *s, struct vq *q)
{
    if (q->quiet)
        return 0;
    q->quiet = true;
    if (!(q->sh.flags & SVQ_DEV_EVENT_IDX))
        st16(q->sh.avail, AVAIL_F_NO_INTERRUPT);
    if (q->g.flags & SVQ_F_EVENT_IDX)
        return 0;
    st16(q->g.used, USED_F_NO_NOTIFY);
    return logging(q) ? log_written(s, q, q->g.log_used_gpa, 2) : 0;
}

/* Write avail_event (guest EVENT_IDX) so the guest kicks once it publishes past what was consumed. */
static int set_avail_event(svq_t *s, struct vq *q, uint16_t value)
{
    struct gring *g = &q->g;
    uint8_t *p = g->used + 4 + 8 * (size_t)g->num;
    if (ld16(p) == value)
        return 0;
    st16(p, value);
    return logging(q) ? log_written(s, q, g->log_used_gpa + 4 + 8 * (uint64_t)g->num, 2) : 0;
}

/* Guest used->flags back to "notify me" (the core starts and ends with it clear, whoever set it before). */
static int clear_no_notify(svq_t *s, struct vq *q)
{
    if (!ld16(q->g.used))
        return 0;
    st16(q->g.used, 0);
    return logging(q) ? log_written(s, q, q->g.log_used_gpa, 2) : 0;
}

/* Returns true when either side has work the core can do now (after asking both to notify again). */
static bool arm_vq(svq_t *s, struct vq *q)
{
    struct gring *g = &q->g;
    struct sring *r = &q->sh;
    q->quiet = false;
    if (r->flags & SVQ_DEV_EVENT_IDX)
        st16(r->avail + 4 + 2 * (size_t)r->num, r->last_used);
    else
        st16(r->avail, 0);
    /* NO_NOTIFY is meaningless with EVENT_IDX, but one left by a passthrough device must not outlive it */
    if (clear_no_notify(s, q) || ((g->flags & SVQ_F_EVENT_IDX) && set_avail_event(s, q, g->last_avail)))
        return false;
    full_fence(); /* our stores above against the other sides' index stores: one of us sees the other */
    /* A stalled guest chain waits for room, which only a device used entry (seen below) makes. */
    bool guest = !q->stalled && ld16_acq(g->avail + 2) != g->last_avail;
    return guest || ld16_acq(r->used + 2) != r->last_used;
}

static bool vq_active(const struct vq *q) { return q->has_guest && q->has_shadow && !is_broken(q); }

/* One round over every vq. *more is set when a vq stopped early with work left (its budget). */
static uint32_t process_all(svq_t *s, bool *more)
{
    uint32_t total = 0;
    for (uint32_t i = 0; i < s->nvqs; i++) {
        struct vq *q = &s->vqs[i];
        if (!vq_active(q))
            continue;
        uint32_t moved = process_used(s, q);
        if (!is_broken(q))
            moved += process_avail(s, q, more);
        if (moved) {
            stat_add(&q->st.batches, 1);
            if (!is_broken(q))
                quiet_vq(s, q);
        }
        total += moved;
    }
    return total;
}

/* Arm every active vq; true when one of them has work already. */
static bool arm_all(svq_t *s)
{
    bool work = false;
    for (uint32_t i = 0; i < s->nvqs; i++) {
        struct vq *q = &s->vqs[i];
        if (vq_active(q) && arm_vq(s, q) && !is_broken(q))
            work = true;
    }
    return work;
}

/* ---- the thread ------------------------------------------------------------------------------------------ */

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void handle_event(svq_t *s, const struct epoll_event *ev)
{
    uint64_t vqi = ev->data.u64 >> 1;
    bool is_call = ev->data.u64 & 1;
    if (vqi >= s->nvqs)
        return;
    struct vq *q = &s->vqs[vqi];
    int fd = is_call ? q->sh.call_fd : q->g.kick_fd;
    int rc = (ev->events & EPOLLIN) ? drain_fd(fd) : -EPIPE;
    if (rc > 0) {
        stat_add(is_call ? &q->st.dev_calls : &q->st.guest_kicks, 1);
        return;
    }
    if (rc == 0)
        return;
    /* A hung-up or failing fd stays ready forever: stop watching it so the thread cannot spin. */
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, fd, NULL);
    vq_fail(s, q, "%s fd: %s", is_call ? "device call" : "guest kick", rc == -EPIPE ? "hung up" : strerror(-rc));
}

/* The data path, from a start until the stop flag (or a failed epoll). */
static void svq_run(svq_t *s)
{
    struct epoll_event evs[32];
    int timeout = 0; /* first round: pick up whatever was pending before start */
    uint64_t busy_until = 0, slept_at = 0;
    /* Busy-polling pays only while wake-ups come faster than the poll would last: count the sleeps that ended
     * within busy_poll_us in a row, and poll only after two. At a low packet rate (or idle) the thread sleeps at
     * once and costs no CPU; the one short sleep of a lone packet (its device completion) does not start a poll. */
    uint32_t short_sleeps = 0;
    uint32_t spins = 0;
    for (;;) {
        /* While busy the rings are looked at anyway: collect the (suppressed, so rare) events now and then only,
         * instead of a syscall per round. The stop flag is what ends the thread between two epoll_waits. */
        if (timeout || (++spins & 15) == 0) {
            int n = epoll_wait(s->epfd, evs, 32, timeout);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                for (uint32_t i = 0; i < s->nvqs; i++)
                    if (vq_active(&s->vqs[i]))
                        vq_fail(s, &s->vqs[i], "epoll_wait: %s", strerror(errno));
                return;
            }
            if (timeout && s->busy_poll_us) {
                bool short_sleep = now_us() - slept_at < s->busy_poll_us;
                short_sleeps = short_sleep ? (short_sleeps < 2 ? short_sleeps + 1 : 2) : 0;
            }
            for (int i = 0; i < n; i++) {
                if (evs[i].data.u64 == CTL_TOKEN)
                    return;
                handle_event(s, &evs[i]);
            }
        }
        if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE))
            return;
        bool more = false;
        uint32_t moved = process_all(s, &more);
        timeout = 0;
        if (moved || more) {
            if (s->busy_poll_us && short_sleeps >= 2) {
                if (!busy_until)
                    stat_add(&s->tst.polls, 1);
                busy_until = now_us() + s->busy_poll_us;
            }
            continue;
        }
        if (busy_until && now_us() < busy_until) {
            /* Polling, but not a time slice spun away: on a CPU shared with whoever fills or drains the other
             * ring (the device's own thread, a vCPU) they run now, and no eventfd wake-up is ever needed.
             * With the CPU to itself this returns at once: a plain bounded spin. */
            stat_add(&s->tst.yields, 1);
            sched_yield();
            continue;
        }
        if (busy_until) {
            busy_until = 0;
            short_sleeps = 0; /* a poll that ran dry: the next one waits for fast wake-ups again */
        }
        if (!arm_all(s)) {
            timeout = -1;
            slept_at = now_us();
            stat_add(&s->tst.sleeps, 1);
        }
    }
}

/*
 * One thread per core for its whole life: a stop parks it and a start wakes it, so a mode switch or a paused
 * configuration call pays a condition-variable round trip instead of a thread exit and creation (which on a busy
 * CPU took ~100 µs of a switch). run_gen counts starts; `parked` is true while the thread is outside svq_run.
 */
static void *svq_thread(void *arg)
{
    svq_t *s = arg;
    sigset_t all;
    sigfillset(&all);
    /* Signals belong to the Python main thread; a write to a dead pipe comes back as EPIPE. */
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&s->park_lock);
        while (s->run_gen == seen && !s->exit_thread)
            pthread_cond_wait(&s->park_cv, &s->park_lock);
        if (s->exit_thread) {
            pthread_mutex_unlock(&s->park_lock);
            return NULL;
        }
        seen = s->run_gen;
        pthread_mutex_unlock(&s->park_lock);
        svq_run(s);
        pthread_mutex_lock(&s->park_lock);
        s->parked = true;
        pthread_cond_broadcast(&s->park_cv);
        pthread_mutex_unlock(&s->park_lock);
    }
}

static int watch(svq_t *s, struct vq *q, int fd, uint64_t token, const char *what)
{
    if (fd < 0)
        return 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = token};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) == 0 || errno == EEXIST)
        return 0; /* a shared fd is watched once; every wake-up processes every vq anyway */
    return vq_fail(s, q, "%s fd cannot be polled: %s", what, strerror(errno));
}

static int thread_start(svq_t *s)
{
    if (s->running)
        return 0;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (s->epfd < 0)
        return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = CTL_TOKEN};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->ctl_efd, &ev) < 0) {
        int e = errno;
        close_fd(&s->epfd);
        return -e;
    }
    for (uint32_t i = 0; i < s->nvqs; i++) {
        struct vq *q = &s->vqs[i];
        if (!vq_active(q))
            continue;
        if (!watch(s, q, q->g.kick_fd, (uint64_t)i << 1, "guest kick"))
            watch(s, q, q->sh.call_fd, ((uint64_t)i << 1) | 1, "device call");
    }
    if (!s->has_thread) {
        int rc = pthread_create(&s->thread, NULL, svq_thread, s);
        if (rc) {
            close_fd(&s->epfd);
            return -rc;
        }
        s->has_thread = true;
    }
    pthread_mutex_lock(&s->park_lock);
    s->parked = false; /* here, not in the thread: a stop right after this start must wait for the run to end */
    s->run_gen++;
    pthread_cond_broadcast(&s->park_cv);
    pthread_mutex_unlock(&s->park_lock);
    s->running = true;
    return 0;
}

static void thread_stop(svq_t *s)
{
    if (!s->running)
        return;
    __atomic_store_n(&s->stop, true, __ATOMIC_RELEASE);
    signal_fd(s->ctl_efd);
    pthread_mutex_lock(&s->park_lock);
    while (!s->parked)
        pthread_cond_wait(&s->park_cv, &s->park_lock);
    pthread_mutex_unlock(&s->park_lock);
    s->stop = false;
    uint64_t v;
    while (read(s->ctl_efd, &v, sizeof(v)) > 0) {
    }
    close_fd(&s->epfd);
    s->running = false;
}

/* ---- API ------------------------------------------------------------------------------------------------- */

int svq_abi_version(void) { return SVQ_ABI_VERSION; }

svq_t *svq_new(uint32_t nvqs, int error_efd)
{
    if (!nvqs || nvqs > SVQ_MAX_VQS) {
        errno = EINVAL;
        return NULL;
    }
    svq_t *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->nvqs = nvqs;
    s->error_efd = s->ctl_efd = s->epfd = -1;
    s->vqs = calloc(nvqs, sizeof(*s->vqs));
    int e = ENOMEM;
    if (!s->vqs)
        goto fail;
    for (uint32_t i = 0; i < nvqs; i++) {
        struct vq *q = &s->vqs[i];
        q->g.kick_fd = q->g.call_fd = q->sh.kick_fd = q->sh.call_fd = -1;
        /* default attributes: glibc's init cannot fail then, so there is nothing to unwind per vq */
        pthread_mutex_init(&q->info_lock, NULL);
    }
    if ((e = -dup_fd(error_efd, &s->error_efd)))
        goto fail;
    s->ctl_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->ctl_efd < 0) {
        e = errno;
        goto fail;
    }
    if ((e = pthread_mutex_init(&s->lock, NULL)))
        goto fail;
    if ((e = pthread_mutex_init(&s->park_lock, NULL))) {
        pthread_mutex_destroy(&s->lock);
        goto fail;
    }
    if ((e = pthread_cond_init(&s->park_cv, NULL))) {
        pthread_mutex_destroy(&s->park_lock);
        pthread_mutex_destroy(&s->lock);
        goto fail;
    }
    s->parked = true;
    return s;
fail:
    close_fd(&s->ctl_efd);
    close_fd(&s->error_efd);
    free(s->vqs);
    free(s);
    errno = e;
    return NULL;
}

static void detach_guest(struct vq *q)
{
    close_fd(&q->g.kick_fd);
    close_fd(&q->g.call_fd);
    q->has_guest = false;
}

static void detach_shadow(svq_t *s, struct vq *q)
{
    struct sring *r = &q->sh;
    for (uint32_t i = 0; q->has_shadow && i < r->num; i++)
        if (r->hd[i].in_use && r->hd[i].injected)
            s->inj_mask &= ~(1ull << r->hd[i].slot);
    close_fd(&r->kick_fd);
    close_fd(&r->call_fd);
    free(r->next);
    free(r->sd);
    free(r->hd);
    r->next = NULL;
    r->sd = NULL;
    r->hd = NULL;
    r->inflight = 0;
    q->has_shadow = false;
}

void svq_free(svq_t *s)
{
    if (!s)
        return;
    thread_stop(s);
    if (s->has_thread) {
        pthread_mutex_lock(&s->park_lock);
        s->exit_thread = true;
        pthread_cond_broadcast(&s->park_cv);
        pthread_mutex_unlock(&s->park_lock);
        pthread_join(s->thread, NULL);
    }
    for (uint32_t i = 0; i < s->nvqs; i++) {
        detach_guest(&s->vqs[i]);
        detach_shadow(s, &s->vqs[i]);
        pthread_mutex_destroy(&s->vqs[i].info_lock);
    }
    close_fd(&s->ctl_efd);
    close_fd(&s->error_efd);
    pthread_cond_destroy(&s->park_cv);
    pthread_mutex_destroy(&s->park_lock);
    pthread_mutex_destroy(&s->lock);
    free(s->regions);
    free(s->vqs);
    free(s);
}

/* Configuration runs with the thread paused: it then owns every vq exclusively. */
static bool pause_thread(svq_t *s)
{
    pthread_mutex_lock(&s->lock);
    bool was = s->running;
    thread_stop(s);
    return was;
}

static int resume_thread(svq_t *s, bool was, int rc)
{
    if (was) {
        int rc2 = thread_start(s);
        if (!rc)
            rc = rc2;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

static struct vq *vq_of(svq_t *s, uint32_t vq) { return (s && vq < s->nvqs) ? &s->vqs[vq] : NULL; }

/* Resolve the guest ring parts through the current region table; checks every part lies inside one region. */
static int resolve_guest(svq_t *s, struct gring *g)
{
    uint8_t *desc = gpa_local(s, g->desc_gpa, (uint64_t)DESC_SIZE * g->num);
    uint8_t *avail = gpa_local(s, g->avail_gpa, 6 + 2 * (uint64_t)g->num);
    uint8_t *used = gpa_local(s, g->used_gpa, 6 + 8 * (uint64_t)g->num);
    if (!desc || !avail || !used)
        return -EFAULT;
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return -EINVAL;
    g->desc = desc;
    g->avail = avail;
    g->used = used;
    return 0;
}

int svq_set_regions(svq_t *s, const struct svq_region *r, uint32_t n)
{
    if (!s || n > SVQ_MAX_REGIONS || (n && !r))
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        if (!r[i].size || !r[i].local || r[i].gpa > UINT64_MAX - r[i].size ||
            r[i].local > UINTPTR_MAX - r[i].size || r[i].iova > UINT64_MAX - r[i].size)
            return -EINVAL;
        for (uint32_t j = 0; j < i; j++)
            if (r[i].gpa < r[j].gpa + r[j].size && r[j].gpa < r[i].gpa + r[i].size)
                return -EINVAL;
    }
    struct svq_region *copy = NULL;
    if (n) {
        copy = malloc(sizeof(*copy) * n);
        if (!copy)
            return -ENOMEM;
        memcpy(copy, r, sizeof(*copy) * n);
    }
    bool was = pause_thread(s);
    free(s->regions);
    s->regions = copy;
    s->nregions = n;
    s->identity = true;
    for (uint32_t i = 0; i < n; i++)
        s->identity = s->identity && copy[i].iova == copy[i].gpa;
    /* Ring pointers from the old table may point at unmapped memory now: re-resolve every attached ring. */
    for (uint32_t i = 0; i < s->nvqs; i++) {
        struct vq *q = &s->vqs[i];
        if (q->has_guest && resolve_guest(s, &q->g))
            vq_fail(s, q, "guest ring is no longer inside guest memory after a region change");
    }
    return resume_thread(s, was, 0);
}

int svq_attach_guest(svq_t *s, uint32_t vq, uint32_t num, uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                     uint16_t last_avail, int kick_fd, int call_fd, uint32_t flags, uint64_t log_used_gpa)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !is_pow2(num) || num > SVQ_MAX_RING || (flags & ~(uint32_t)GUEST_FLAGS))
        return -EINVAL;
    if ((flags & SVQ_F_LOG) && log_used_gpa > UINT64_MAX - (6 + 8 * (uint64_t)num))
        return -EINVAL;
    struct gring g = {.num = num, .desc_gpa = desc_gpa, .avail_gpa = avail_gpa, .used_gpa = used_gpa,
                      .log_used_gpa = log_used_gpa, .last_avail = last_avail, .kick_fd = -1, .call_fd = -1,
                      .flags = flags};
    bool was = pause_thread(s);
    int rc = 0;
    if (is_broken(q) || (q->has_shadow && q->sh.inflight)) {
        rc = is_broken(q) ? -EIO : -EBUSY;
        goto out;
    }
    if ((desc_gpa & 15) || (avail_gpa & 1) || (used_gpa & 3)) {
        set_reason(q, "guest ring parts are misaligned");
        rc = -EINVAL;
        goto out;
    }
    if ((rc = resolve_guest(s, &g))) {
        set_reason(q, "guest ring (desc 0x%llx avail 0x%llx used 0x%llx, %u entries) is "
                 "not inside guest memory", (unsigned long long)desc_gpa, (unsigned long long)avail_gpa,
                 (unsigned long long)used_gpa, num);
        goto out;
    }
    g.used_idx = ld16_acq(g.used + 2);
    if ((uint16_t)(last_avail - g.used_idx) > num) {
        set_reason(q, "guest used idx %u is more than %u behind last_avail %u",
                 g.used_idx, num, last_avail);
        rc = -ERANGE;
        goto out;
    }
    if ((rc = dup_fd(kick_fd, &g.kick_fd)) || (rc = dup_fd(call_fd, &g.call_fd))) {
        close_fd(&g.kick_fd);
        goto out;
    }
    g.call_is_efd = g.call_fd >= 0 && fd_is_eventfd(g.call_fd);
    detach_guest(q);
    q->g = g;
    q->has_guest = true;
    q->quiet = false;
    set_reason(q, "%s", "");
out:
    return resume_thread(s, was, rc);
}

int svq_attach_shadow(svq_t *s, uint32_t vq, uint32_t num, void *desc, void *avail, void *used, uint16_t base,
                      int dev_kick_fd, int dev_call_fd, uint32_t dev_flags)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !is_pow2(num) || num > SVQ_MAX_RING || (dev_flags & ~(uint32_t)DEV_FLAGS) ||
        (dev_flags & SVQ_DEV_MRG_RXBUF && dev_flags & SVQ_DEV_NO_MRG_RXBUF) || !desc || !avail ||
        !used || ((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return -EINVAL;
    struct sring r = {.num = num, .desc = desc, .avail = avail, .used = used, .avail_idx = base, .last_used = base,
                      .kick_fd = -1, .call_fd = -1, .flags = dev_flags, .nfree = num};
    r.next = calloc(num, sizeof(*r.next));
    r.sd = calloc(num, sizeof(*r.sd));
    r.hd = calloc(num, sizeof(*r.hd));
    int rc = (!r.next || !r.sd || !r.hd) ? -ENOMEM : 0;
    if (!rc && !(rc = dup_fd(dev_kick_fd, &r.kick_fd)))
        rc = dup_fd(dev_call_fd, &r.call_fd);
    if (rc) {
        close_fd(&r.kick_fd);
        free(r.next);
        free(r.sd);
        free(r.hd);
        return rc;
    }
    r.kick_is_efd = r.kick_fd >= 0 && fd_is_eventfd(r.kick_fd);
    for (uint32_t i = 0; i < num; i++)
        r.next[i] = i + 1;
    bool was = pause_thread(s);
    if (is_broken(q) || (q->has_shadow && q->sh.inflight)) {
        rc = is_broken(q) ? -EIO : -EBUSY;
        close_fd(&r.kick_fd);
        close_fd(&r.call_fd);
        free(r.next);
        free(r.sd);
        free(r.hd);
        return resume_thread(s, was, rc);
    }
    /* The device is not running on this ring yet: start it from a clean, known state at `base`. */
    memset(desc, 0, (size_t)DESC_SIZE * num);
    memset(avail, 0, 6 + 2 * (size_t)num);
    memset(used, 0, 6 + 8 * (size_t)num);
    st16(r.avail + 2, base);
    st16(r.used + 2, base);
    detach_shadow(s, q);
    q->sh = r;
    q->has_shadow = true;
    q->quiet = false;
    q->stalled = false;
    return resume_thread(s, was, 0);
}

int svq_detach(svq_t *s, uint32_t vq)
{
    struct vq *q = vq_of(s, vq);
    if (!q)
        return -EINVAL;
    bool was = pause_thread(s);
    detach_guest(q);
    detach_shadow(s, q);
    __atomic_store_n(&q->broken, 0, __ATOMIC_RELEASE);
    set_reason(q, "%s", "");
    return resume_thread(s, was, 0);
}

int svq_start(svq_t *s)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int rc = thread_start(s);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int svq_stop(svq_t *s)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    thread_stop(s);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int svq_running(svq_t *s)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int r = s->running;
    pthread_mutex_unlock(&s->lock);
    return r;
}

int svq_set_busy_poll(svq_t *s, uint32_t usec)
{
    if (!s || usec > 1000000)
        return -EINVAL;
    bool was = pause_thread(s);
    s->busy_poll_us = usec;
    return resume_thread(s, was, 0);
}

/* Calls made from the caller's thread may write to a pipe: keep SIGPIPE from reaching the process. */
static void block_sigpipe(sigset_t *old)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, old);
}

int svq_poll(svq_t *s)
{
    if (!s)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    if (s->running) {
        pthread_mutex_unlock(&s->lock);
        return -EBUSY;
    }
    sigset_t old;
    block_sigpipe(&old);
    bool more = false;
    uint32_t moved = process_all(s, &more);
    /* End as the thread would before sleeping: both sides asked to notify, and nothing left behind. */
    for (int i = 0; i < 4 && arm_all(s); i++)
        moved += process_all(s, &more);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_mutex_unlock(&s->lock);
    return moved > INT32_MAX ? INT32_MAX : (int)moved;
}

int svq_set_log(svq_t *s, void *log_base, uint64_t log_size)
{
    if (!s || (log_base && !log_size) || (!log_base && log_size))
        return -EINVAL;
    bool was = pause_thread(s);
    s->log = log_base;
    s->log_size = log_size;
    return resume_thread(s, was, 0);
}

int svq_set_vq_log(svq_t *s, uint32_t vq, int on, uint64_t log_used_gpa)
{
    struct vq *q = vq_of(s, vq);
    if (!q)
        return -EINVAL;
    bool was = pause_thread(s);
    int rc = 0;
    if (!q->has_guest)
        rc = -ENOTCONN;
    else if (on && log_used_gpa > UINT64_MAX - (6 + 8 * (uint64_t)q->g.num))
        rc = -EINVAL;
    else if (on) {
        q->g.flags |= SVQ_F_LOG;
        q->g.log_used_gpa = log_used_gpa;
    } else {
        q->g.flags &= ~(uint32_t)SVQ_F_LOG;
    }
    return resume_thread(s, was, rc);
}

int svq_set_guest_call(svq_t *s, uint32_t vq, int call_fd)
{
    struct vq *q = vq_of(s, vq);
    if (!q)
        return -EINVAL;
    int fd = -1;
    int rc = dup_fd(call_fd, &fd);
    if (rc)
        return rc;
    bool is_efd = fd >= 0 && fd_is_eventfd(fd);
    bool was = pause_thread(s);
    if (!q->has_guest) {
        close_fd(&fd);
        return resume_thread(s, was, -ENOTCONN);
    }
    close_fd(&q->g.call_fd);
    q->g.call_fd = fd;
    q->g.call_is_efd = is_efd;
    /* A used entry published while the front-end swapped its fds may have signalled the old one: signal the new
     * one once (a spurious interrupt costs the guest a look at its used ring, a lost one stalls it). */
    if (fd >= 0)
        (void)notify_fd(fd, is_efd);
    return resume_thread(s, was, 0);
}

static int cmp_age(const void *a, const void *b)
{
    const uint32_t *x = a, *y = b; /* {age, head}: oldest (largest age) first */
    return (x[0] < y[0]) - (x[0] > y[0]);
}

/*
 * With the device suspended: complete what the device completed, complete with len 0 what it consumed but did
 * not complete, rewind what it never consumed, and hand the vq back. Nothing is written to guest memory after.
 */
static int drain(svq_t *s, struct vq *q, uint16_t dev_last_avail, uint16_t *guest_base)
{
    struct gring *g = &q->g;
    struct sring *r = &q->sh;
    process_used(s, q); /* a suspended device does not move its used index: one pass takes everything */
    if (is_broken(q))
        return -EIO;
    uint16_t unconsumed = (uint16_t)(r->avail_idx - dev_last_avail);
    uint32_t below = 0, injected_below = 0;
    uint32_t *done = calloc(2 * (size_t)(r->inflight + 1), sizeof(*done));
    if (!done)
        return -ENOMEM;
    uint32_t ndone = 0;
    for (uint32_t i = 0; i < r->num; i++) {
        if (!r->hd[i].in_use)
            continue;
        uint16_t age = (uint16_t)(r->avail_idx - r->hd[i].avail_pos);
        if (age <= unconsumed) {
            below++;
            injected_below += r->hd[i].injected;
        } else if (!r->hd[i].injected) { /* a consumed proxy frame is simply forgotten */
            done[2 * ndone] = age;
            done[2 * ndone + 1] = i;
            ndone++;
        }
    }
    if (below != unconsumed) {
        set_reason(q, "device last_avail %u does not match %u unconsumed of %u in flight",
                 dev_last_avail, below, r->inflight);
        free(done);
        return -ERANGE;
    }
    uint16_t old_used = g->used_idx;
    qsort(done, ndone, 2 * sizeof(*done), cmp_age);
    int rc = 0;
    for (uint32_t k = 0; k < ndone && !rc; k++) {
        uint32_t head = done[2 * k + 1];
        /* The device may have written part of an RX buffer before suspending: log all of it. */
        if (logging(q) && log_chain(s, q, head, UINT64_MAX))
            rc = -EIO;
        else if (put_used(s, q, head, 0))
            rc = -EIO;
    }
    free(done);
    if (rc || publish_used(s, q, old_used))
        return -EIO;
    for (uint32_t i = 0; i < r->num; i++)
        if (r->hd[i].in_use)
            release_chain(s, r, i);
    /* Proxy frames are not in the guest's ring: only the guest's own unconsumed chains are rewound. */
    g->last_avail = (uint16_t)(g->last_avail - (uint16_t)(unconsumed - injected_below));
    /* Whoever takes the ring next (the device in passthrough) starts from "notify me": no NO_NOTIFY left
     * behind, and an avail_event at the base so the guest's next entry kicks. */
    if (clear_no_notify(s, q) || ((g->flags & SVQ_F_EVENT_IDX) && set_avail_event(s, q, g->last_avail)))
        return -EIO;
    *guest_base = g->last_avail;
    detach_guest(q);
    detach_shadow(s, q);
    return 0;
}

int svq_drain_vq(svq_t *s, uint32_t vq, uint16_t dev_last_avail, uint16_t *guest_base)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !guest_base)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int rc;
    if (s->running)
        rc = -EBUSY;
    else if (!q->has_guest || !q->has_shadow)
        rc = -ENOTCONN;
    else if (is_broken(q))
        rc = -EIO;
    else {
        sigset_t old;
        block_sigpipe(&old);
        rc = drain(s, q, dev_last_avail, guest_base);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int svq_set_inject_area(svq_t *s, void *local, uint64_t iova, uint64_t size)
{
    if (!s || !local != !size)
        return -EINVAL;
    if (local && (size < SVQ_INJECT_SLOT || (uintptr_t)local > UINTPTR_MAX - size || iova > UINT64_MAX - size))
        return -EINVAL;
    bool was = pause_thread(s);
    int rc = 0;
    if (s->inj_mask) {
        rc = -EBUSY; /* the device may still read a slot of the old area */
    } else {
        s->inj_local = local;
        s->inj_iova = iova;
        uint64_t slots = size / SVQ_INJECT_SLOT;
        s->inj_slots = slots > SVQ_INJECT_SLOTS ? SVQ_INJECT_SLOTS : (uint32_t)slots;
    }
    return resume_thread(s, was, rc);
}

static int inject(svq_t *s, struct vq *q, const void *frame, uint32_t len)
{
    struct sring *r = &q->sh;
    if (!q->has_guest || !q->has_shadow)
        return -ENOTCONN;
    if (is_broken(q))
        return -EIO;
    if (q->g.flags & SVQ_F_RX)
        return -EINVAL;
    uint64_t all = s->inj_slots >= 64 ? UINT64_MAX : (1ull << s->inj_slots) - 1;
    if (!s->inj_slots || (s->inj_mask & all) == all)
        return -ENOBUFS;
    if (!r->nfree)
        return -EAGAIN;
    uint32_t slot = (uint32_t)__builtin_ctzll(~s->inj_mask);
    memcpy(s->inj_local + (size_t)slot * SVQ_INJECT_SLOT, frame, len);
    struct chain c = {.first = NO_DESC, .pend_id = NO_DESC};
    emit(r, &c, 0, len, 0, s->inj_iova + (uint64_t)slot * SVQ_INJECT_SLOT);
    memcpy(r->desc + (size_t)c.pend_id * DESC_SIZE, &c.pend, sizeof(c.pend));
    r->hd[c.first] = (struct shead){.ndesc = 1, .in_use = true, .injected = true, .slot = (uint8_t)slot};
    s->inj_mask |= 1ull << slot;
    uint16_t old_avail = r->avail_idx;
    offer(r, c.first);
    st16_rel(r->avail + 2, r->avail_idx);
    return kick_device(s, q, old_avail);
}

int svq_inject_tx(svq_t *s, uint32_t vq, const void *frame, size_t len)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !frame || !len || len > SVQ_INJECT_SLOT)
        return -EINVAL;
    bool was = pause_thread(s);
    sigset_t old;
    block_sigpipe(&old);
    int rc = inject(s, q, frame, (uint32_t)len);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return resume_thread(s, was, rc);
}

int svq_get_learned_mac(svq_t *s, uint32_t vq, uint8_t *out)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !out)
        return -EINVAL;
    pthread_mutex_lock(&q->info_lock);
    int have = q->mac_valid;
    if (have)
        memcpy(out, q->mac, 6);
    pthread_mutex_unlock(&q->info_lock);
    return have;
}

int svq_get_thread_stats(svq_t *s, struct svq_thread_stats *out)
{
    if (!s || !out)
        return -EINVAL;
    out->sleeps = __atomic_load_n(&s->tst.sleeps, __ATOMIC_RELAXED);
    out->polls = __atomic_load_n(&s->tst.polls, __ATOMIC_RELAXED);
    out->yields = __atomic_load_n(&s->tst.yields, __ATOMIC_RELAXED);
    return 0;
}

int svq_get_stats(svq_t *s, uint32_t vq, struct svq_stats *out)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !out)
        return -EINVAL;
#define LOAD(f) out->f = __atomic_load_n(&q->st.f, __ATOMIC_RELAXED)
    LOAD(packets);
    LOAD(bytes);
    LOAD(guest_kicks);
    LOAD(guest_calls);
    LOAD(dev_kicks);
    LOAD(dev_calls);
    LOAD(batches);
    LOAD(faults);
    LOAD(dirty_pages);
    LOAD(clamped);
    LOAD(injected);
    LOAD(mac_changes);
#undef LOAD
    out->broken = is_broken(q);
    pthread_mutex_lock(&s->lock);
    out->attached = (uint32_t)q->has_guest | (uint32_t)q->has_shadow << 1;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int svq_get_vq_state(svq_t *s, uint32_t vq, struct svq_vq_state *out)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !out)
        return -EINVAL;
    bool was = pause_thread(s);
    *out = (struct svq_vq_state){
        .guest_last_avail = q->g.last_avail,
        .guest_used = q->g.used_idx,
        .shadow_avail = q->sh.avail_idx,
        .shadow_used = q->sh.last_used,
        .inflight = q->has_shadow ? q->sh.inflight : 0,
        .attached = (uint32_t)q->has_guest | (uint32_t)q->has_shadow << 1,
    };
    return resume_thread(s, was, 0);
}

int svq_vq_error(svq_t *s, uint32_t vq, char *buf, size_t len)
{
    struct vq *q = vq_of(s, vq);
    if (!q || !buf || !len)
        return -EINVAL;
    pthread_mutex_lock(&q->info_lock);
    snprintf(buf, len, "%s", q->reason);
    pthread_mutex_unlock(&q->info_lock);
    return (int)strlen(buf);
}
