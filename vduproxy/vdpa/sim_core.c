/*
 * sim_core: native data path of the software vDPA net device. See sim_core.h for the contract.
 *
 * Locking: one mutex per device protects everything below. The thread holds it for one bounded processing
 * round and drops it between rounds; API calls take it too. So when sim_suspend() returns, the thread is
 * between rounds and will not touch a ring again until resumed: get_vring_base is then exact. Pointers
 * translated through the IOTLB are only used inside the round that translated them, so an IOTLB update or
 * invalidate (which needs the lock) can never leave the thread with a stale pointer.
 *
 * Fairness: a thread that re-takes a mutex in a loop can starve a waiter; API callers announce themselves in
 * `waiters` and the thread steps aside (condition wait) until they are done.
 *
 * Sleeping without losing a wake-up: kick eventfds are drained before a round, never after, so a kick that
 * lands during the round wakes the next epoll_wait. Before sleeping, each consumer that stopped asks for the
 * kick that restarts it (avail_event with EVENT_IDX; this device never sets VRING_USED_F_NO_NOTIFY) and
 * re-reads avail->idx after a full barrier; used->idx is published before used_event / NO_INTERRUPT is read,
 * with a full barrier between (vq_flush). A TX chain waiting for RX room asks for an RX kick instead.
 */
#define _GNU_SOURCE
#include "sim_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sim_core assumes a little-endian host (virtio 1.x rings are little endian)"
#endif

/* virtio feature bits used by the data path */
#define F_CTRL_GUEST_OFFLOADS (1ULL << 2)
#define F_MRG_RXBUF (1ULL << 15)
#define F_CTRL_VQ (1ULL << 17)
#define F_CTRL_RX (1ULL << 18)
#define F_CTRL_VLAN (1ULL << 19)
#define F_CTRL_RX_EXTRA (1ULL << 20)
#define F_GUEST_ANNOUNCE (1ULL << 21)
#define F_MQ (1ULL << 22)
#define F_CTRL_MAC_ADDR (1ULL << 23)
#define F_INDIRECT_DESC (1ULL << 28)
#define F_EVENT_IDX (1ULL << 29)
#define F_VERSION_1 (1ULL << 32)
/* offloads GUEST_OFFLOADS_SET may toggle: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO, GUEST_USO4/6 */
#define GUEST_OFFLOAD_MASK ((1ULL << 1) | (1ULL << 7) | (1ULL << 8) | (1ULL << 9) | (1ULL << 10) | (1ULL << 54) | (1ULL << 55))

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1

#define NET_S_ANNOUNCE 2
#define NET_OK 0
#define NET_ERR 1

#define SIM_MAX_IOV 1024      /* per direction of one chain; also bounds writev (IOV_MAX) */
#define SIM_MAX_INDIRECT 1024 /* entries of one indirect table */
#define SIM_MAX_FRAME (65536 + 14 + 4)
#define SIM_CVQ_MAX 8192 /* longest control command we read (a MAC table of ~1300 entries) */
#define SIM_BUDGET 256   /* chains per vq per round: bounds how long the lock is held */
#define SIM_FAULT_QUEUE 64

enum { EV_CTRL = 1, EV_TAP = 2, EV_KICK = 3 };
#define EV_DATA(kind, idx) (((uint64_t)(kind) << 32) | (uint32_t)(idx))

struct map {
    uint64_t iova;
    uint64_t last; /* inclusive */
    uint64_t uaddr;
    uint32_t perm;
};

struct iotlb {
    struct map *m; /* sorted by iova, never overlapping */
    uint32_t n, cap;
};

struct seg {
    uint8_t *p;
    size_t len;
};

struct chain {
    uint16_t head;
    uint32_t n_rd, n_wr;
    size_t rd_len, wr_len;
    struct seg rd[SIM_MAX_IOV];
    struct seg wr[SIM_MAX_IOV];
};

struct vq {
    uint32_t num;
    uint64_t desc_iova, avail_iova, used_iova;
    bool addr_set;
    bool enabled;
    bool started; /* enabled and allowed to run: set at DRIVER_OK, or at enable when ENABLE_AFTER_DRIVER_OK */
    uint16_t last_avail;
    uint16_t used_idx; /* next used slot (device-private until published) */
    uint16_t used_pub; /* last value stored to used->idx */
    int kick_fd, call_fd;
    uint64_t gen; /* IOTLB generation the ring pointers below were translated in; 0 = stale */
    uint8_t *desc, *avail, *used;
    uint64_t packets, bytes, kicks, calls, faults, dropped, waits;
    /* TX of a loopback pair: the next chain waits for the pair's RX to start or have room (rx_full_wait) */
    bool rx_wait;
    /* RX: avail->idx when a frame last found too few buffers; more buffers after it are what a waiter needs */
    uint16_t avail_seen;
    bool has_error;
    char error[SIM_REASON_LEN];
    /* injected faults (sim_inject_fault): not cleared by a reset */
    bool inject_miss;
    bool stuck;
};

struct sim_dev {
    struct sim_params p;
    uint32_t nvqs;
    int cvq_index; /* -1 without CVQ */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int waiters;
    pthread_t thread;
    bool thread_started;
    bool stop;

    int ep, ctrl_fd, fault_fd, tap_fd;
    bool tap_armed;   /* tap_fd is polled for input; off while RX 0 has no room, so a queued frame stays queued */
    bool tap_blocked; /* the last TAP pass left a frame queued because RX 0 is stopped or has no room */
    bool tap_waiting; /* ... because RX 0 has no room (counted in its `waits` once per episode) */
    size_t tap_len;   /* length of the frame held in tap_buf (read from the TAP, not yet delivered); 0 = none */

    uint64_t features;
    bool driver_ok, suspended;
    uint32_t group_asid[SIM_MAX_GROUPS];

    struct iotlb live[SIM_MAX_AS];
    struct iotlb stage[SIM_MAX_AS];
    bool staged[SIM_MAX_AS];
    bool in_batch;
    uint64_t iotlb_gen;

    struct vq vq[SIM_MAX_VQS];
    uint8_t config[SIM_CONFIG_SIZE];
    struct sim_filter filt;

    uint64_t rounds; /* processing rounds run by the thread */

    struct sim_fault faults[SIM_FAULT_QUEUE];
    uint32_t fault_head, fault_count;
    uint64_t faults_lost;

    /* scratch of the data path (too big for the thread stack) */
    struct chain tx, rx_first, rx_cur;
    struct iovec wv[SIM_MAX_IOV];
    uint8_t *frame;   /* SIM_MAX_FRAME: CVQ commands */
    uint8_t *tap_buf; /* SIM_MAX_FRAME: a TAP frame, kept across rounds while RX 0 has no room for it */
};

struct xerr {
    uint64_t iova;
    const char *why;
};

/* ---------- small helpers ---------- */

static uint16_t ld16_acquire(const uint8_t *p) { return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE); }
static uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED); }
static void st16_release(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE); }
static void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static bool is_pow2(uint32_t n) { return n != 0 && (n & (n - 1)) == 0; }

static size_t hdr_len(const struct sim_dev *d) { return (d->features & (F_VERSION_1 | F_MRG_RXBUF)) ? 12 : 10; }

static void wake(struct sim_dev *d)
{
    uint64_t one = 1;
    /* the counter only overflows after 2^64-2 unread wakes; a failed write changes nothing we rely on */
    if (write(d->ctrl_fd, &one, sizeof one) != (ssize_t)sizeof one) {
        return;
    }
}

/* Whether the data-path thread looks at vqs at all (under the API lock). Configuration of a device that is not
 * running (before DRIVER_OK, or suspended) needs no wake-up: on a CPU shared with the driver every wake-up is a
 * pair of context switches per call, and a driver sets a reset device up with dozens of calls. */
static bool thread_active(const struct sim_dev *d) { return d->driver_ok && !d->suspended; }

static void api_lock(struct sim_dev *d)
{
    atomic_fetch_add(&d->waiters, 1);
    pthread_mutex_lock(&d->mu);
    atomic_fetch_sub(&d->waiters, 1);
}

static void api_unlock(struct sim_dev *d)
{
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* api_unlock, then wake the thread if the call gave it something to act on (`wanted`) and it is running. */
static void api_unlock_wake(struct sim_dev *d, bool wanted)
{
    bool wake_it = wanted && thread_active(d);
    api_unlock(d);
    if (wake_it) {
        wake(d);
    }
}

static void thread_lock(struct sim_dev *d)
{
    pthread_mutex_lock(&d->mu);
    while (atomic_load(&d->waiters) > 0) {
        pthread_cond_wait(&d->cv, &d->mu);
    }
}

static uint32_t vq_asid(const struct sim_dev *d, uint32_t idx)
{
    uint32_t group = ((int)idx == d->cvq_index) ? d->p.cvq_group : 0;
    return d->group_asid[group];
}

static bool vq_running(const struct sim_dev *d, uint32_t idx)
{
    const struct vq *q = &d->vq[idx];
    if ((int)idx == d->cvq_index) {
        if (!(d->features & F_CTRL_VQ)) {
            return false;
        }
    } else {
        /* virtio 1.3 5.1.6.5.5: only the first pair is in use until VQ_PAIRS_SET says otherwise */
        uint32_t active = (d->features & F_MQ) ? d->filt.active_pairs : 1;
        if (idx / 2 >= active) {
            return false;
        }
    }
    return d->driver_ok && !d->suspended && q->started && q->addr_set && !q->has_error && !q->stuck;
}

static void vq_fault(struct sim_dev *d, uint32_t idx, const char *why, uint64_t iova)
{
    struct vq *q = &d->vq[idx];
    q->faults++;
    q->has_error = true;
    snprintf(q->error, sizeof q->error, "%s", why);
    if (d->fault_count < SIM_FAULT_QUEUE) {
        struct sim_fault *f = &d->faults[(d->fault_head + d->fault_count) % SIM_FAULT_QUEUE];
        f->vq = idx;
        f->iova = iova;
        snprintf(f->reason, sizeof f->reason, "%s", why);
        d->fault_count++;
    } else {
        d->faults_lost++;
    }
    uint64_t one = 1;
    if (write(d->fault_fd, &one, sizeof one) != (ssize_t)sizeof one) {
        d->faults_lost++;
    }
}

/* ---------- IOTLB ---------- */

/* first map whose last >= iova (may not contain iova) */
static uint32_t iotlb_lower(const struct iotlb *t, uint64_t iova)
{
    uint32_t lo = 0, hi = t->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->m[mid].last < iova) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static const struct map *iotlb_lookup(const struct iotlb *t, uint64_t iova)
{
    uint32_t i = iotlb_lower(t, iova);
    if (i < t->n && t->m[i].iova <= iova) {
        return &t->m[i];
    }
    return NULL;
}

static bool perm_ok(const struct map *m, uint32_t perm, uint64_t iova, struct xerr *e)
{
    if ((m->perm & perm) == perm) {
        return true;
    }
    e->iova = iova;
    e->why = (perm & SIM_PERM_WO) ? "device write to a read-only mapping" : "device read of a write-only mapping";
    return false;
}

static uint8_t *map_host(const struct map *m, uint64_t iova) { return (uint8_t *)(uintptr_t)(m->uaddr + (iova - m->iova)); }

/* [iova, iova+len) as one host-contiguous area (adjacent maps that are contiguous in memory are merged) */
static uint8_t *xlate_contig(const struct iotlb *t, uint64_t iova, uint64_t len, uint32_t perm, struct xerr *e)
{
    uint64_t end = iova + len - 1;
    if (len == 0 || end < iova) {
        e->iova = iova;
        e->why = "ring area wraps around the IOVA space";
        return NULL;
    }
    const struct map *m = iotlb_lookup(t, iova);
    if (m == NULL) {
        e->iova = iova;
        e->why = "access to an unmapped IOVA";
        return NULL;
    }
    if (!perm_ok(m, perm, iova, e)) {
        return NULL;
    }
    uint8_t *host = map_host(m, iova);
    const struct map *prev = m;
    const struct map *stop = t->m + t->n;
    while (prev->last < end) {
        const struct map *nx = prev + 1;
        if (nx >= stop || nx->iova != prev->last + 1) {
            e->iova = prev->last + 1;
            e->why = "access to an unmapped IOVA";
            return NULL;
        }
        if (nx->uaddr != prev->uaddr + (prev->last - prev->iova + 1)) {
            e->iova = nx->iova;
            e->why = "ring area split across non-contiguous mappings";
            return NULL;
        }
        if (!perm_ok(nx, perm, nx->iova, e)) {
            return NULL;
        }
        prev = nx;
    }
    return host;
}

static int xlate_segs(const struct iotlb *t, uint64_t addr, uint32_t len, uint32_t perm, struct seg *v, uint32_t *n,
                      size_t *total, struct xerr *e)
{
    if (len == 0) {
        return 0;
    }
    uint64_t end = addr + len - 1;
    if (end < addr) {
        e->iova = addr;
        e->why = "buffer wraps around the IOVA space";
        return -1;
    }
    for (;;) {
        const struct map *m = iotlb_lookup(t, addr);
        if (m == NULL) {
            e->iova = addr;
            e->why = "access to an unmapped IOVA";
            return -1;
        }
        if (!perm_ok(m, perm, addr, e)) {
            return -1;
        }
        if (*n >= SIM_MAX_IOV) {
            e->iova = addr;
            e->why = "descriptor chain has too many segments";
            return -1;
        }
        /* m->last < end here implies m->last < UINT64_MAX, so the +1 cannot overflow */
        uint64_t chunk = (end <= m->last) ? end - addr + 1 : m->last - addr + 1;
        v[*n].p = map_host(m, addr);
        v[*n].len = (size_t)chunk;
        (*n)++;
        *total += (size_t)chunk;
        if (end <= m->last) {
            return 0;
        }
        addr = m->last + 1;
    }
}

static void iotlb_free(struct iotlb *t)
{
    free(t->m);
    t->m = NULL;
    t->n = t->cap = 0;
}

static int iotlb_reserve(struct iotlb *t, uint32_t want, uint32_t limit)
{
    if (want <= t->cap) {
        return 0;
    }
    if (want > limit) {
        return -ENOSPC;
    }
    uint32_t cap = t->cap ? t->cap : 16;
    while (cap < want) {
        cap = (cap > limit / 2) ? limit : cap * 2;
    }
    struct map *m = realloc(t->m, (size_t)cap * sizeof *m);
    if (m == NULL) {
        return -ENOMEM;
    }
    t->m = m;
    t->cap = cap;
    return 0;
}

/* the table an update/invalidate goes to: inside a batch, a private copy swapped in at batch end */
static struct iotlb *iotlb_target(struct sim_dev *d, uint32_t asid, int *rc)
{
    *rc = 0;
    if (!d->in_batch) {
        return &d->live[asid];
    }
    struct iotlb *s = &d->stage[asid];
    if (!d->staged[asid]) {
        *rc = iotlb_reserve(s, d->live[asid].n, d->p.max_iotlb_entries);
        if (*rc) {
            return NULL;
        }
        if (d->live[asid].n) {
            memcpy(s->m, d->live[asid].m, (size_t)d->live[asid].n * sizeof *s->m);
        }
        s->n = d->live[asid].n;
        d->staged[asid] = true;
    }
    return s;
}

/* ---------- rings ---------- */

static int vq_refresh(struct sim_dev *d, uint32_t idx)
{
    struct vq *q = &d->vq[idx];
    if (q->gen == d->iotlb_gen) {
        return 0;
    }
    const struct iotlb *t = &d->live[vq_asid(d, idx)];
    bool ev = (d->features & F_EVENT_IDX) != 0;
    struct xerr e = {0, NULL};
    uint8_t *desc = xlate_contig(t, q->desc_iova, 16ULL * q->num, SIM_PERM_RO, &e);
    uint8_t *avail = desc ? xlate_contig(t, q->avail_iova, 4ULL + 2ULL * q->num + (ev ? 2 : 0), SIM_PERM_RO, &e) : NULL;
    uint8_t *used = avail ? xlate_contig(t, q->used_iova, 4ULL + 8ULL * q->num + (ev ? 2 : 0), SIM_PERM_WO, &e) : NULL;
    if (used == NULL) {
        vq_fault(d, idx, e.why, e.iova);
        return -1;
    }
    if (((uintptr_t)avail & 1) || ((uintptr_t)used & 3)) {
        vq_fault(d, idx, "ring maps to a misaligned host address", q->avail_iova);
        return -1;
    }
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->gen = d->iotlb_gen;
    return 0;
}

/* 1: *head is the next available chain; 0: ring empty; -1: the vq faulted */
static int vq_peek(struct sim_dev *d, uint32_t idx, uint16_t *head)
{
    struct vq *q = &d->vq[idx];
    uint16_t aidx = ld16_acquire(q->avail + 2);
    uint16_t pending = (uint16_t)(aidx - q->last_avail);
    if (pending == 0) {
        return 0;
    }
    if (pending > q->num) {
        vq_fault(d, idx, "available index moved further than the ring size", q->avail_iova + 2);
        return -1;
    }
    if (q->inject_miss) {
        /* injected: the first chain the vq would take misses the IOTLB, as an unmapped descriptor table would */
        q->inject_miss = false;
        vq_fault(d, idx, "IOTLB miss (injected)", q->desc_iova);
        return -1;
    }
    uint16_t h = ld16(q->avail + 4 + 2 * (q->last_avail & (q->num - 1)));
    if (h >= q->num) {
        vq_fault(d, idx, "available ring entry is not a descriptor index", q->avail_iova);
        return -1;
    }
    *head = h;
    return 1;
}

enum want { WANT_READ = 1, WANT_WRITE = 2, WANT_ANY = 3 };

struct rawdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static int walk_chain(struct sim_dev *d, uint32_t idx, uint16_t head, struct chain *c, enum want want)
{
    struct vq *q = &d->vq[idx];
    const struct iotlb *t = &d->live[vq_asid(d, idx)];
    const uint8_t *table = q->desc;
    uint32_t table_n = q->num;
    uint32_t limit = q->num;
    uint32_t count = 0;
    uint32_t i = head;
    bool indirect = false;
    struct xerr e = {0, NULL};

    c->head = head;
    c->n_rd = c->n_wr = 0;
    c->rd_len = c->wr_len = 0;
    for (;;) {
        struct rawdesc rd;
        if (i >= table_n) {
            vq_fault(d, idx, "descriptor index out of range", q->desc_iova);
            return -1;
        }
        if (++count > limit) {
            vq_fault(d, idx, "descriptor chain loops or is longer than the ring", q->desc_iova);
            return -1;
        }
        /* one copy per descriptor: the driver may rewrite the table under us, we act on what we read */
        memcpy(&rd, table + 16 * (size_t)i, sizeof rd);
        if (rd.flags & DESC_F_INDIRECT) {
            if (!(d->features & F_INDIRECT_DESC) || indirect || (rd.flags & DESC_F_NEXT)) {
                vq_fault(d, idx, "indirect descriptor not allowed here", rd.addr);
                return -1;
            }
            if (rd.len == 0 || rd.len % 16 || rd.len / 16 > SIM_MAX_INDIRECT) {
                vq_fault(d, idx, "indirect table length invalid", rd.addr);
                return -1;
            }
            const uint8_t *it = xlate_contig(t, rd.addr, rd.len, SIM_PERM_RO, &e);
            if (it == NULL) {
                vq_fault(d, idx, e.why, e.iova);
                return -1;
            }
            table = it;
            table_n = limit = rd.len / 16;
            count = 0;
            i = 0;
            indirect = true;
            continue;
        }
        if (rd.flags & DESC_F_WRITE) {
            if (!(want & WANT_WRITE)) {
                vq_fault(d, idx, "device-writable descriptor in a transmit chain", rd.addr);
                return -1;
            }
            if (xlate_segs(t, rd.addr, rd.len, SIM_PERM_WO, c->wr, &c->n_wr, &c->wr_len, &e)) {
                vq_fault(d, idx, e.why, e.iova);
                return -1;
            }
        } else {
            if (!(want & WANT_READ)) {
                vq_fault(d, idx, "device-readable descriptor in a receive chain", rd.addr);
                return -1;
            }
            if (c->n_wr) {
                vq_fault(d, idx, "device-readable descriptor after a writable one", rd.addr);
                return -1;
            }
            if (xlate_segs(t, rd.addr, rd.len, SIM_PERM_RO, c->rd, &c->n_rd, &c->rd_len, &e)) {
                vq_fault(d, idx, e.why, e.iova);
                return -1;
            }
        }
        if (!(rd.flags & DESC_F_NEXT)) {
            return 0;
        }
        i = rd.next;
    }
}

static void vq_push_used(struct vq *q, uint16_t head, uint32_t len)
{
    uint8_t *e = q->used + 4 + 8 * (size_t)(q->used_idx & (q->num - 1));
    uint32_t id = head;
    memcpy(e, &id, 4);
    memcpy(e + 4, &len, 4);
    q->used_idx++;
    q->last_avail++;
}

static void vq_signal(struct vq *q)
{
    if (q->call_fd < 0) {
        return;
    }
    uint64_t one = 1;
    /* EAGAIN only when the counter is saturated: the driver will be woken anyway */
    if (write(q->call_fd, &one, sizeof one) == (ssize_t)sizeof one) {
        q->calls++;
    }
}

/* publish used entries and notify per used_event / NO_INTERRUPT; ask for kicks via avail_event */
static void vq_flush(struct sim_dev *d, uint32_t idx)
{
    struct vq *q = &d->vq[idx];
    bool ev = (d->features & F_EVENT_IDX) != 0;
    /* a suspended or stopped vq must not see a single store; pushes only happen to running vqs */
    if (q->gen != d->iotlb_gen || q->used == NULL || (q->used_idx == q->used_pub && !vq_running(d, idx))) {
        return;
    }
    if (ev && !q->has_error) {
        st16(q->used + 4 + 8 * (size_t)q->num, q->last_avail);
    }
    if (q->used_idx == q->used_pub) {
        return;
    }
    uint16_t old = q->used_pub, now = q->used_idx;
    st16_release(q->used + 2, now);
    q->used_pub = now;
    /* the store above must be visible before we read the driver's suppression state */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool notify;
    if (ev) {
        uint16_t used_event = ld16(q->avail + 4 + 2 * (size_t)q->num);
        notify = (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
    } else {
        notify = !(ld16(q->avail) & AVAIL_F_NO_INTERRUPT);
    }
    if (notify) {
        vq_signal(q);
    }
}

/* whether the driver added chains after we last looked (closes the race with avail_event) */
static bool vq_has_more(struct sim_dev *d, uint32_t idx)
{
    struct vq *q = &d->vq[idx];
    if (!vq_running(d, idx) || q->gen != d->iotlb_gen) {
        return false;
    }
    if (d->features & F_EVENT_IDX) {
        st16(q->used + 4 + 8 * (size_t)q->num, q->last_avail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    return ld16_acquire(q->avail + 2) != q->last_avail;
}

/*
 * Whether RX vq `idx` got buffers after a frame last found too few (a waiting TX chain or TAP frame can try
 * again). With EVENT_IDX it first asks for a kick on the next buffer added after the ones that did not
 * suffice; the full barrier between that store and the re-read pairs with the driver's barrier between
 * publishing avail->idx and reading avail_event, so either we see the new buffers or the driver kicks.
 * Without EVENT_IDX the driver kicks for every buffer (this device never sets VRING_USED_F_NO_NOTIFY).
 */
static bool rx_has_more(struct sim_dev *d, uint32_t idx)
{
    struct vq *q = &d->vq[idx];
    if (!vq_running(d, idx) || q->gen != d->iotlb_gen) {
        return false; /* every call that can start it again wakes the thread */
    }
    if (d->features & F_EVENT_IDX) {
        st16(q->used + 4 + 8 * (size_t)q->num, q->avail_seen);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return ld16_acquire(q->avail + 2) != q->avail_seen;
}

/* ---------- scatter-gather copy ---------- */

struct cur {
    const struct seg *v;
    uint32_t n, i;
    size_t off;
};

static void cur_init(struct cur *c, const struct seg *v, uint32_t n)
{
    c->v = v;
    c->n = n;
    c->i = 0;
    c->off = 0;
}

static void cur_skip(struct cur *c, size_t bytes)
{
    while (bytes && c->i < c->n) {
        size_t room = c->v[c->i].len - c->off;
        size_t k = bytes < room ? bytes : room;
        c->off += k;
        bytes -= k;
        if (c->off == c->v[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
}

static size_t cur_copy(struct cur *dst, struct cur *src, size_t n)
{
    size_t done = 0;
    while (done < n && dst->i < dst->n && src->i < src->n) {
        size_t a = dst->v[dst->i].len - dst->off;
        size_t b = src->v[src->i].len - src->off;
        size_t k = n - done;
        k = k < a ? k : a;
        k = k < b ? k : b;
        memcpy(dst->v[dst->i].p + dst->off, src->v[src->i].p + src->off, k);
        done += k;
        cur_skip(dst, k);
        cur_skip(src, k);
        /* zero-length segments would stall the loop: skip past them */
        while (dst->i < dst->n && dst->v[dst->i].len == 0) {
            dst->i++;
        }
        while (src->i < src->n && src->v[src->i].len == 0) {
            src->i++;
        }
    }
    return done;
}

static void write_bytes(const struct seg *v, uint32_t n, const uint8_t *data, size_t len)
{
    struct seg s = {(uint8_t *)(uintptr_t)data, len};
    struct cur dst, src;
    cur_init(&dst, v, n);
    cur_init(&src, &s, 1);
    cur_copy(&dst, &src, len);
}

/* ---------- RX filter ---------- */

static bool mac_in(const uint8_t (*table)[6], uint32_t count, const uint8_t *mac)
{
    for (uint32_t i = 0; i < count && i < SIM_MAC_TABLE_MAX; i++) {
        if (memcmp(table[i], mac, 6) == 0) {
            return true;
        }
    }
    return false;
}

/* Receive filter with QEMU virtio-net semantics (hw/net/virtio-net.c receive_filter). */
static bool filter_accept(const struct sim_dev *d, const uint8_t *f, size_t len)
{
    const struct sim_filter *fl = &d->filt;
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (len < 14) {
        return false;
    }
    if (fl->promisc) {
        return true;
    }
    if ((d->features & F_CTRL_VLAN) && len >= 16 && f[12] == 0x81 && f[13] == 0x00) {
        uint32_t vid = ((uint32_t)f[14] << 8 | f[15]) & 0xfff;
        if (!(fl->vlans[vid >> 5] & (1U << (vid & 31)))) {
            return false;
        }
    }
    if (memcmp(f, bcast, 6) == 0) {
        return !fl->nobcast;
    }
    if (f[0] & 1) {
        if (fl->nomulti) {
            return false;
        }
        if (fl->allmulti || fl->mc_overflow) {
            return true;
        }
        return mac_in((const uint8_t(*)[6])fl->mc, fl->mc_count, f);
    }
    if (fl->nouni) {
        return false;
    }
    if (fl->alluni || fl->uc_overflow) {
        return true;
    }
    if (memcmp(f, d->config, 6) == 0) {
        return true;
    }
    return mac_in((const uint8_t(*)[6])fl->uc, fl->uc_count, f);
}

/*
 * Reset state of the filter. By default the device accepts every frame until the driver programs it (QEMU's
 * virtio-net starts promiscuous the same way), because the proxy may never get to send a MAC to the device.
 * vdpa_sim_net instead filters unicast by its config MAC from the start and accepts all multicast; the
 * `filter_mac_only` parameter (profile vdpasim) reproduces that.
 */
static void filter_reset(struct sim_dev *d)
{
    memset(&d->filt, 0, sizeof d->filt);
    d->filt.active_pairs = 1;
    if (d->p.filter_mac_only) {
        d->filt.allmulti = 1;
    } else {
        d->filt.promisc = 1;
    }
}

/* ---------- control virtqueue ---------- */

enum { CLS_RX = 0, CLS_MAC = 1, CLS_VLAN = 2, CLS_ANNOUNCE = 3, CLS_MQ = 4, CLS_GUEST_OFFLOADS = 5 };

static uint8_t cvq_mac_table(struct sim_dev *d, const uint8_t *data, size_t len)
{
    size_t off = 0;
    uint32_t n_uc, n_mc;
    const uint8_t *uc, *mc;
    if (len < 4) {
        return NET_ERR;
    }
    n_uc = le32(data);
    off = 4;
    if (n_uc > (len - off) / 6) {
        return NET_ERR;
    }
    uc = data + off;
    off += 6 * (size_t)n_uc;
    if (len - off < 4) {
        return NET_ERR;
    }
    n_mc = le32(data + off);
    off += 4;
    if (n_mc > (len - off) / 6) {
        return NET_ERR;
    }
    mc = data + off;
    struct sim_filter *fl = &d->filt;
    fl->uc_overflow = n_uc > SIM_MAC_TABLE_MAX;
    fl->uc_count = fl->uc_overflow ? 0 : n_uc;
    memcpy(fl->uc, uc, 6 * (size_t)fl->uc_count);
    fl->mc_overflow = n_mc > SIM_MAC_TABLE_MAX;
    fl->mc_count = fl->mc_overflow ? 0 : n_mc;
    memcpy(fl->mc, mc, 6 * (size_t)fl->mc_count);
    return NET_OK;
}

static uint8_t cvq_handle(struct sim_dev *d, const uint8_t *cmd, size_t len)
{
    uint8_t cls = cmd[0], op = cmd[1];
    const uint8_t *data = cmd + 2;
    size_t dlen = len - 2;
    uint64_t f = d->features;
    struct sim_filter *fl = &d->filt;

    switch (cls) {
    case CLS_RX: {
        uint8_t *flag[] = {&fl->promisc, &fl->allmulti, &fl->alluni, &fl->nomulti, &fl->nouni, &fl->nobcast};
        if (op > 5 || dlen < 1) {
            return NET_ERR;
        }
        if (!(f & (op <= 1 ? F_CTRL_RX : F_CTRL_RX_EXTRA))) {
            return NET_ERR;
        }
        *flag[op] = data[0] ? 1 : 0;
        return NET_OK;
    }
    case CLS_MAC:
        if (op == 1) { /* MAC_ADDR_SET: the config MAC is the filter's own address, as in vdpa_sim_net */
            if (!(f & F_CTRL_MAC_ADDR) || dlen < 6) {
                return NET_ERR;
            }
            memcpy(d->config, data, 6);
            return NET_OK;
        }
        if (op == 0 && (f & F_CTRL_RX)) {
            return cvq_mac_table(d, data, dlen);
        }
        return NET_ERR;
    case CLS_VLAN: {
        if (!(f & F_CTRL_VLAN) || op > 1 || dlen < 2) {
            return NET_ERR;
        }
        uint16_t vid = le16(data);
        if (vid >= 4096) {
            return NET_ERR;
        }
        if (op == 0) {
            fl->vlans[vid >> 5] |= 1U << (vid & 31);
        } else {
            fl->vlans[vid >> 5] &= ~(1U << (vid & 31));
        }
        return NET_OK;
    }
    case CLS_ANNOUNCE:
        if (!(f & F_GUEST_ANNOUNCE) || op != 0) {
            return NET_ERR;
        }
        d->config[6] &= (uint8_t)~NET_S_ANNOUNCE;
        return NET_OK;
    case CLS_MQ: {
        if (!(f & F_MQ) || op != 0 || dlen < 2) {
            return NET_ERR; /* RSS and HASH_CONFIG are not offered */
        }
        uint16_t pairs = le16(data);
        if (pairs < 1 || pairs > d->p.pairs) {
            return NET_ERR;
        }
        fl->active_pairs = pairs;
        return NET_OK;
    }
    case CLS_GUEST_OFFLOADS: {
        if (!(f & F_CTRL_GUEST_OFFLOADS) || op != 0 || dlen < 8) {
            return NET_ERR;
        }
        uint64_t off = (uint64_t)le32(data) | (uint64_t)le32(data + 4) << 32;
        if (off & ~(f & GUEST_OFFLOAD_MASK)) {
            return NET_ERR;
        }
        fl->guest_offloads = off;
        return NET_OK;
    }
    default:
        return NET_ERR;
    }
}

static uint32_t process_cvq(struct sim_dev *d, uint32_t idx)
{
    struct vq *q = &d->vq[idx];
    struct chain *c = &d->tx;
    uint32_t done = 0;
    while (done < SIM_BUDGET) {
        uint16_t head;
        if (vq_peek(d, idx, &head) <= 0) {
            break;
        }
        if (walk_chain(d, idx, head, c, WANT_ANY)) {
            break;
        }
        if (c->wr_len < 1) {
            vq_fault(d, idx, "control command without a writable status byte", 0);
            break;
        }
        uint8_t ack = NET_ERR;
        if (c->rd_len >= 2 && c->rd_len <= SIM_CVQ_MAX) {
            struct seg s = {d->frame, c->rd_len};
            struct cur dst, src;
            cur_init(&dst, &s, 1);
            cur_init(&src, c->rd, c->n_rd);
            cur_copy(&dst, &src, c->rd_len);
            ack = cvq_handle(d, d->frame, c->rd_len);
        }
        write_bytes(c->wr, c->n_wr, &ack, 1);
        d->filt.cvq_commands++;
        q->packets++;
        q->bytes += c->rd_len;
        vq_push_used(q, head, 1);
        done++;
    }
    return done;
}

/* ---------- data queues ---------- */

enum rx_result {
    RX_DONE,    /* delivered */
    RX_DROP,    /* dropped and counted: filtered, RX faulted, a buffer that can never hold it */
    RX_NOROOM,  /* not delivered, nothing counted: too few RX buffers right now (rq->avail_seen says how many) */
    RX_STOPPED, /* not delivered, nothing counted: RX is not started (yet) */
};

/* Deliver one frame (from `src`, `len` bytes, `peek` = its first bytes) to RX vq `rxi`. */
static enum rx_result deliver_rx(struct sim_dev *d, uint32_t rxi, struct cur *src, size_t len, const uint8_t *peek,
                                 size_t peek_len)
{
    struct vq *rq = &d->vq[rxi];
    size_t hl = hdr_len(d);
    bool mrg = (d->features & F_MRG_RXBUF) != 0;
    enum rx_result fail = RX_DROP;
    if (!vq_running(d, rxi) && !rq->has_error) {
        return RX_STOPPED;
    }
    if (!vq_running(d, rxi) || vq_refresh(d, rxi)) {
        rq->dropped++;
        return RX_DROP;
    }
    if (!filter_accept(d, peek, peek_len)) {
        rq->dropped++;
        return RX_DROP;
    }
    uint16_t start_avail = rq->last_avail, start_used = rq->used_idx;
    size_t remaining = len;
    uint16_t nbufs = 0;
    bool first = true;
    while (first || remaining > 0) {
        uint16_t head;
        int r = vq_peek(d, rxi, &head);
        if (r < 0) {
            goto rollback;
        }
        if (r == 0) {
            /* out of buffers; a whole ring of them not sufficing means no amount of waiting will */
            if (nbufs < rq->num) {
                rq->avail_seen = rq->last_avail;
                fail = RX_NOROOM;
            }
            goto rollback;
        }
        struct chain *c = first ? &d->rx_first : &d->rx_cur;
        if (walk_chain(d, rxi, head, c, WANT_WRITE)) {
            goto rollback;
        }
        struct cur dst;
        cur_init(&dst, c->wr, c->n_wr);
        size_t written = 0;
        if (first) {
            /* without MRG_RXBUF one buffer must hold the whole frame; drop rather than truncate */
            if (c->wr_len < hl || (!mrg && c->wr_len - hl < len)) {
                goto rollback;
            }
            cur_skip(&dst, hl);
            written = hl;
        }
        size_t k = cur_copy(&dst, src, remaining);
        remaining -= k;
        written += k;
        vq_push_used(rq, head, (uint32_t)written);
        nbufs++;
        first = false;
    }
    uint8_t hdr[12] = {0};
    if (hl == 12) {
        hdr[10] = (uint8_t)(nbufs & 0xff);
        hdr[11] = (uint8_t)(nbufs >> 8);
    }
    write_bytes(d->rx_first.wr, d->rx_first.n_wr, hdr, hl);
    rq->packets++;
    rq->bytes += len;
    return RX_DONE;
rollback:
    /* nothing of a partial frame was published: un-take its buffers */
    rq->last_avail = start_avail;
    rq->used_idx = start_used;
    if (fail == RX_DROP) {
        rq->dropped++;
    }
    return fail;
}

/* Send one TX chain to the back-end. False: not consumed, it waits for the pair's RX (not started, full). */
static bool tx_one(struct sim_dev *d, uint32_t txi, struct chain *c)
{
    struct vq *q = &d->vq[txi];
    size_t hl = hdr_len(d);
    if (c->rd_len < hl) {
        q->dropped++;
        return true;
    }
    size_t len = c->rd_len - hl;
    struct cur src;
    cur_init(&src, c->rd, c->n_rd);
    cur_skip(&src, hl);
    switch (d->p.backend) {
    case SIM_BACKEND_SINK:
        q->packets++;
        q->bytes += len;
        return true;
    case SIM_BACKEND_LOOPBACK: {
        if (len > SIM_MAX_FRAME) {
            q->dropped++;
            return true;
        }
        uint8_t peek[18];
        size_t pk = len < sizeof peek ? len : sizeof peek;
        struct seg ps = {peek, pk};
        struct cur pd, s2 = src;
        cur_init(&pd, &ps, 1);
        cur_copy(&pd, &s2, pk);
        enum rx_result r = deliver_rx(d, txi - 1, &src, len, peek, pk);
        /* vdpa_sim_net leaves TX alone while RX is not ready, whatever rx_full says */
        if (r == RX_STOPPED || (r == RX_NOROOM && d->p.rx_full_wait)) {
            return false;
        }
        if (r == RX_NOROOM) {
            /* like vdpa_sim_net: the frame is gone, its TX chain completes all the same */
            d->vq[txi - 1].dropped++;
        }
        q->packets++;
        q->bytes += len;
        return true;
    }
    case SIM_BACKEND_TAP: {
        uint32_t n = 0;
        for (uint32_t i = src.i; i < src.n && n < SIM_MAX_IOV; i++) {
            size_t off = (i == src.i) ? src.off : 0;
            d->wv[n].iov_base = src.v[i].p + off;
            d->wv[n].iov_len = src.v[i].len - off;
            n++;
        }
        if (len > SIM_MAX_FRAME || writev(d->tap_fd, d->wv, (int)n) != (ssize_t)len) {
            q->dropped++;
            return true;
        }
        q->packets++;
        q->bytes += len;
        return true;
    }
    default:
        q->dropped++;
        return true;
    }
}

static uint32_t process_tx(struct sim_dev *d, uint32_t txi)
{
    struct vq *q = &d->vq[txi];
    uint32_t done = 0;
    while (done < SIM_BUDGET) {
        uint16_t head;
        int r = vq_peek(d, txi, &head);
        if (r <= 0) {
            if (r == 0) {
                q->rx_wait = false;
            }
            break;
        }
        if (walk_chain(d, txi, head, &d->tx, WANT_READ)) {
            break;
        }
        if (!tx_one(d, txi, &d->tx)) {
            /* the chain stays available (not completed, last_avail unmoved) until RX can take it */
            if (!q->rx_wait) {
                q->rx_wait = true;
                q->waits++;
            }
            break;
        }
        q->rx_wait = false;
        vq_push_used(q, head, 0);
        done++;
    }
    return done;
}

static bool tap_readable(const struct sim_dev *d)
{
    struct pollfd p = {.fd = d->tap_fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/*
 * TAP → RX 0, rx_full=drop: like a NIC, every frame is taken off the wire and dropped when RX 0 is stopped
 * or has no room for it.
 */
static uint32_t process_tap_rx_drop(struct sim_dev *d)
{
    struct vq *rq = &d->vq[0];
    uint32_t done = 0;
    d->tap_blocked = d->tap_waiting = false;
    d->tap_len = 0;
    while (done < SIM_BUDGET) {
        ssize_t n = read(d->tap_fd, d->tap_buf, SIM_MAX_FRAME);
        if (n <= 0) {
            break;
        }
        struct seg s = {d->tap_buf, (size_t)n};
        struct cur src;
        cur_init(&src, &s, 1);
        enum rx_result res = deliver_rx(d, 0, &src, (size_t)n, d->tap_buf, (size_t)n);
        if (res == RX_NOROOM || res == RX_STOPPED) {
            rq->dropped++; /* deliver_rx counts only the drops it decides itself */
        }
        done++;
    }
    return done;
}

/*
 * TAP → RX 0, rx_full=wait. A frame is only read when RX 0 has a buffer, and one that finds too few buffers
 * (mergeable RX) is kept in tap_buf until more come: while RX 0 is full or stopped, frames stay in the TAP's
 * queue, where the kernel queues and eventually drops them as it does for any slow reader. Sets
 * d->tap_blocked when it stopped for lack of room or a stopped RX 0.
 */
static uint32_t process_tap_rx(struct sim_dev *d)
{
    struct vq *rq = &d->vq[0];
    uint32_t done = 0;
    if (!d->p.rx_full_wait) {
        return process_tap_rx_drop(d);
    }
    bool was_waiting = d->tap_waiting;
    d->tap_blocked = d->tap_waiting = false;
    while (done < SIM_BUDGET) {
        if (!vq_running(d, 0) || vq_refresh(d, 0)) {
            d->tap_blocked = true;
            break;
        }
        if (d->tap_len == 0) {
            uint16_t head;
            int r = vq_peek(d, 0, &head);
            if (r < 0) {
                d->tap_blocked = true;
                break;
            }
            if (r == 0) {
                /* with nothing queued, keep polling the TAP: its next frame wakes us to start waiting */
                rq->avail_seen = rq->last_avail;
                d->tap_blocked = d->tap_waiting = was_waiting || tap_readable(d);
                break;
            }
            ssize_t n = read(d->tap_fd, d->tap_buf, SIM_MAX_FRAME);
            if (n <= 0) {
                break;
            }
            d->tap_len = (size_t)n;
        }
        struct seg s = {d->tap_buf, d->tap_len};
        struct cur src;
        cur_init(&src, &s, 1);
        enum rx_result res = deliver_rx(d, 0, &src, d->tap_len, d->tap_buf, d->tap_len);
        if (res == RX_NOROOM || res == RX_STOPPED) {
            d->tap_blocked = true;
            d->tap_waiting = res == RX_NOROOM;
            break;
        }
        d->tap_len = 0;
        done++;
    }
    if (d->tap_waiting && !was_waiting) {
        rq->waits++;
    }
    return done;
}

/* Poll the TAP only while its frames have somewhere to go: a readable fd nobody reads would spin epoll. */
static void tap_arm(struct sim_dev *d, bool on)
{
    if (d->tap_fd < 0 || d->tap_armed == on) {
        return;
    }
    struct epoll_event e = {.events = on ? EPOLLIN : 0, .data.u64 = EV_DATA(EV_TAP, 0)};
    if (epoll_ctl(d->ep, EPOLL_CTL_MOD, d->tap_fd, &e) == 0) {
        d->tap_armed = on;
    }
}

/* One bounded pass over every queue. Returns chains processed; *more when work is left over. */
static uint32_t run_round(struct sim_dev *d, bool *more)
{
    uint32_t total = 0;
    *more = false;
    for (uint32_t i = 0; i < d->nvqs; i++) {
        if (vq_running(d, i)) {
            vq_refresh(d, i);
        }
    }
    for (uint32_t i = 1; i < 2 * d->p.pairs; i += 2) {
        if (vq_running(d, i)) {
            uint32_t n = process_tx(d, i);
            total += n;
            if (n == SIM_BUDGET) {
                *more = true;
            }
        }
    }
    if (d->cvq_index >= 0 && vq_running(d, (uint32_t)d->cvq_index)) {
        uint32_t n = process_cvq(d, (uint32_t)d->cvq_index);
        total += n;
        if (n) {
            *more = true; /* a command may have activated queue pairs the TX pass above skipped */
        }
    }
    if (d->tap_fd >= 0) {
        uint32_t n = process_tap_rx(d);
        total += n;
        if (n == SIM_BUDGET) {
            *more = true;
        }
    }
    /*
     * TX completions first: a looped frame must not reach the driver before the TX slot it left is free
     * again. A driver forwarding what it receives (testpmd io) would otherwise find its TX ring full for a
     * moment and drop the frame, and a closed loop loses a few frames that way until none are left.
     */
    for (uint32_t i = 1; i < 2 * d->p.pairs; i += 2) {
        vq_flush(d, i);
    }
    for (uint32_t i = 0; i < d->nvqs; i++) {
        if (!(i & 1) || (int)i == d->cvq_index) {
            vq_flush(d, i);
        }
    }
    /* Before sleeping, ask for the kicks that restart each stopped consumer and re-check after a barrier. */
    if (!*more) {
        for (uint32_t i = 1; i < 2 * d->p.pairs && !*more; i += 2) {
            if (!vq_running(d, i)) {
                continue; /* also when it stopped while waiting: its RX gaining buffers is no reason to run */
            }
            /* a TX vq waiting for RX room needs RX buffers, not TX kicks: re-checking its avail would spin */
            *more = d->vq[i].rx_wait ? rx_has_more(d, i - 1) : vq_has_more(d, i);
        }
        if (!*more && d->cvq_index >= 0) {
            *more = vq_has_more(d, (uint32_t)d->cvq_index);
        }
        if (!*more && d->tap_fd >= 0 && d->tap_blocked) {
            *more = rx_has_more(d, 0);
        }
    }
    tap_arm(d, !d->tap_blocked);
    return total;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void drain_fd(int fd, uint64_t *count)
{
    uint64_t v;
    if (read(fd, &v, sizeof v) == (ssize_t)sizeof v && count) {
        *count += v;
    }
}

static void *thread_main(void *arg)
{
    struct sim_dev *d = arg;
    struct epoll_event ev[32];
    bool more = false;
    uint64_t last_progress = 0;
    for (;;) {
        bool spin = more || (d->p.busy_poll_us && now_us() - last_progress < d->p.busy_poll_us);
        int n = epoll_wait(d->ep, ev, 32, spin ? 0 : -1);
        if (n < 0) {
            n = 0;
        }
        thread_lock(d);
        if (d->stop) {
            pthread_mutex_unlock(&d->mu);
            break;
        }
        for (int i = 0; i < n; i++) {
            uint32_t kind = (uint32_t)(ev[i].data.u64 >> 32);
            uint32_t idx = (uint32_t)ev[i].data.u64;
            if (kind == EV_CTRL) {
                drain_fd(d->ctrl_fd, NULL);
            } else if (kind == EV_KICK && idx < d->nvqs && d->vq[idx].kick_fd >= 0) {
                /* the event may predate a kick fd swap; the fd is nonblocking so a stale read is harmless */
                drain_fd(d->vq[idx].kick_fd, &d->vq[idx].kicks);
            }
        }
        d->rounds++;
        uint32_t done = run_round(d, &more);
        if (done) {
            last_progress = now_us();
        }
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

/* ---------- API ---------- */

int sim_abi_version(void) { return SIM_ABI_VERSION; }

static void vq_reset_state(struct sim_dev *d, struct vq *q)
{
    q->num = d->p.ring_max;
    q->desc_iova = q->avail_iova = q->used_iova = 0;
    q->addr_set = q->enabled = q->started = false;
    q->last_avail = q->used_idx = q->used_pub = q->avail_seen = 0;
    q->rx_wait = false;
    q->gen = 0;
    q->desc = q->avail = q->used = NULL;
    q->has_error = false;
    q->error[0] = '\0';
}

static void dev_free(struct sim_dev *d)
{
    for (uint32_t i = 0; i < SIM_MAX_VQS; i++) {
        if (d->vq[i].kick_fd >= 0) {
            close(d->vq[i].kick_fd);
        }
        if (d->vq[i].call_fd >= 0) {
            close(d->vq[i].call_fd);
        }
    }
    int fds[] = {d->tap_fd, d->ctrl_fd, d->fault_fd, d->ep};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (fds[i] >= 0) {
            close(fds[i]);
        }
    }
    for (uint32_t i = 0; i < SIM_MAX_AS; i++) {
        iotlb_free(&d->live[i]);
        iotlb_free(&d->stage[i]);
    }
    free(d->frame);
    free(d->tap_buf);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

static int epoll_add(int ep, int fd, uint64_t data)
{
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = data};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) ? -errno : 0;
}

static int tap_open(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    memcpy(ifr.ifr_name, name, strnlen(name, IFNAMSIZ - 1));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int sim_create(const struct sim_params *params, struct sim_dev **out)
{
    const struct sim_params *p = params;
    *out = NULL;
    if (p->pairs < 1 || 2 * p->pairs + (p->has_cvq ? 1 : 0) > SIM_MAX_VQS || p->ngroups < 1 ||
        p->ngroups > SIM_MAX_GROUPS || p->cvq_group >= p->ngroups || p->nas < 1 || p->nas > SIM_MAX_AS ||
        !is_pow2(p->ring_max) || p->ring_max > 32768 || p->backend > SIM_BACKEND_SINK ||
        p->max_iotlb_entries < 1 || p->max_iotlb_entries > (1u << 20) ||
        memchr(p->tap_name, 0, sizeof p->tap_name) == NULL) {
        return -EINVAL;
    }
    if (p->backend == SIM_BACKEND_TAP && p->tap_name[0] == '\0') {
        return -EINVAL;
    }
    struct sim_dev *d = calloc(1, sizeof *d);
    if (d == NULL) {
        return -ENOMEM;
    }
    d->p = *p;
    d->nvqs = 2 * p->pairs + (p->has_cvq ? 1 : 0);
    d->cvq_index = p->has_cvq ? (int)(2 * p->pairs) : -1;
    d->ep = d->ctrl_fd = d->fault_fd = d->tap_fd = -1;
    for (uint32_t i = 0; i < SIM_MAX_VQS; i++) {
        d->vq[i].kick_fd = d->vq[i].call_fd = -1;
        vq_reset_state(d, &d->vq[i]);
    }
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    atomic_init(&d->waiters, 0);
    d->iotlb_gen = 1;
    memcpy(d->config, p->config, SIM_CONFIG_SIZE);
    filter_reset(d);

    int rc = 0;
    d->frame = malloc(SIM_MAX_FRAME);
    d->ep = epoll_create1(EPOLL_CLOEXEC);
    d->ctrl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    d->fault_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->frame == NULL) {
        rc = -ENOMEM;
    } else if (d->ep < 0 || d->ctrl_fd < 0 || d->fault_fd < 0) {
        rc = -errno;
    }
    if (!rc && p->backend == SIM_BACKEND_TAP) {
        d->tap_buf = malloc(SIM_MAX_FRAME);
        d->tap_fd = d->tap_buf ? tap_open(p->tap_name) : -ENOMEM;
        if (d->tap_fd < 0) {
            rc = d->tap_fd;
            d->tap_fd = -1;
        }
    }
    if (!rc) {
        rc = epoll_add(d->ep, d->ctrl_fd, EV_DATA(EV_CTRL, 0));
    }
    if (!rc && d->tap_fd >= 0) {
        rc = epoll_add(d->ep, d->tap_fd, EV_DATA(EV_TAP, 0));
        d->tap_armed = rc == 0;
    }
    if (!rc) {
        /* the thread must not take Python's signals (SIGINT, SIGPIPE from a dead call fd): block them all */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        rc = -pthread_create(&d->thread, NULL, thread_main, d);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        d->thread_started = (rc == 0);
    }
    if (rc) {
        dev_free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void sim_destroy(struct sim_dev *d)
{
    if (d == NULL) {
        return;
    }
    if (d->thread_started) {
        api_lock(d);
        d->stop = true;
        api_unlock(d);
        wake(d);
        pthread_join(d->thread, NULL);
    }
    dev_free(d);
}

int sim_fault_fd(struct sim_dev *d) { return d->fault_fd; }

int sim_set_features(struct sim_dev *d, uint64_t features)
{
    api_lock(d);
    d->features = features;
    d->iotlb_gen++; /* ring sizes depend on EVENT_IDX */
    /* virtio 1.3 5.1.6.5.6.2 (and QEMU): every negotiated guest offload is on until GUEST_OFFLOADS_SET */
    d->filt.guest_offloads = features & GUEST_OFFLOAD_MASK;
    api_unlock(d);
    return 0;
}

int sim_set_driver_ok(struct sim_dev *d)
{
    api_lock(d);
    if (!d->driver_ok) {
        d->driver_ok = true;
        for (uint32_t i = 0; i < d->nvqs; i++) {
            d->vq[i].started = d->vq[i].enabled;
        }
    }
    api_unlock(d);
    wake(d);
    return 0;
}

int sim_reset(struct sim_dev *d, int keep_iotlb)
{
    api_lock(d);
    d->driver_ok = false;
    d->suspended = false;
    d->features = 0;
    for (uint32_t i = 0; i < SIM_MAX_VQS; i++) {
        vq_reset_state(d, &d->vq[i]);
    }
    for (uint32_t i = 0; i < SIM_MAX_GROUPS; i++) {
        d->group_asid[i] = 0;
    }
    if (!keep_iotlb) {
        for (uint32_t i = 0; i < SIM_MAX_AS; i++) {
            d->live[i].n = 0;
        }
    }
    for (uint32_t i = 0; i < SIM_MAX_AS; i++) {
        d->stage[i].n = 0;
        d->staged[i] = false;
    }
    d->in_batch = false;
    d->iotlb_gen++;
    /* like vdpa_sim, the config space (the MAC set through the CVQ) survives a reset */
    d->config[6] &= (uint8_t)~NET_S_ANNOUNCE;
    filter_reset(d);
    api_unlock(d);
    return 0;
}

int sim_suspend(struct sim_dev *d)
{
    api_lock(d);
    d->suspended = true;
    api_unlock(d);
    return 0;
}

int sim_resume(struct sim_dev *d)
{
    api_lock(d);
    d->suspended = false;
    api_unlock(d);
    wake(d);
    return 0;
}

int sim_get_config(struct sim_dev *d, uint32_t offset, uint8_t *out, uint32_t len)
{
    if (len == 0 || offset > SIM_CONFIG_SIZE) {
        return -EINVAL;
    }
    if (len > SIM_CONFIG_SIZE - offset) {
        return -E2BIG;
    }
    api_lock(d);
    memcpy(out, d->config + offset, len);
    api_unlock(d);
    return 0;
}

int sim_set_config(struct sim_dev *d, uint32_t offset, const uint8_t *data, uint32_t len)
{
    /* only the MAC is writable: the other fields describe the device */
    if (len == 0 || offset >= 6 || len > 6 - offset) {
        return -EINVAL;
    }
    api_lock(d);
    memcpy(d->config + offset, data, len);
    api_unlock(d);
    return 0;
}

int sim_set_group_asid(struct sim_dev *d, uint32_t group, uint32_t asid)
{
    if (group >= d->p.ngroups || asid >= d->p.nas) {
        return -EINVAL;
    }
    api_lock(d);
    d->group_asid[group] = asid;
    d->iotlb_gen++;
    api_unlock_wake(d, true);
    return 0;
}

static bool vq_busy(const struct sim_dev *d, uint32_t idx)
{
    const struct vq *q = &d->vq[idx];
    return d->driver_ok && !d->suspended && q->started && !q->has_error;
}

int sim_set_vring_num(struct sim_dev *d, uint32_t index, uint32_t num)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    if (!is_pow2(num) || num > d->p.ring_max) {
        return -EINVAL;
    }
    int rc = 0;
    api_lock(d);
    if (vq_busy(d, index)) {
        rc = -EBUSY;
    } else {
        d->vq[index].num = num;
        d->vq[index].gen = 0;
    }
    api_unlock(d);
    return rc;
}

int sim_set_vring_addr(struct sim_dev *d, uint32_t index, uint64_t desc, uint64_t avail, uint64_t used)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    if ((desc & 15) || (avail & 1) || (used & 3)) {
        return -EINVAL;
    }
    int rc = 0;
    api_lock(d);
    if (vq_busy(d, index)) {
        rc = -EBUSY;
    } else {
        struct vq *q = &d->vq[index];
        q->desc_iova = desc;
        q->avail_iova = avail;
        q->used_iova = used;
        q->addr_set = true;
        q->gen = 0;
    }
    api_unlock_wake(d, true);
    return rc;
}

int sim_set_vring_base(struct sim_dev *d, uint32_t index, uint32_t base)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    if (base > 0xffff) {
        return -EINVAL;
    }
    int rc = 0;
    api_lock(d);
    if (vq_busy(d, index)) {
        rc = -EBUSY;
    } else {
        struct vq *q = &d->vq[index];
        /* split rings complete in order here, so the used index restarts where avail does */
        q->last_avail = q->used_idx = q->used_pub = q->avail_seen = (uint16_t)base;
        q->rx_wait = false;
    }
    api_unlock(d);
    return rc;
}

int sim_get_vring_base(struct sim_dev *d, uint32_t index, uint32_t *base)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    api_lock(d);
    *base = d->vq[index].last_avail;
    api_unlock(d);
    return 0;
}

static int set_vring_fd(struct sim_dev *d, uint32_t index, int fd, bool kick)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    int nfd = -1;
    if (fd >= 0) {
        /* like the kernel taking an eventfd reference: the caller may close its fd afterwards */
        nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (nfd < 0) {
            return -errno;
        }
        int fl = fcntl(nfd, F_GETFL);
        if (fl < 0 || fcntl(nfd, F_SETFL, fl | O_NONBLOCK) < 0) {
            int rc = -errno;
            close(nfd);
            return rc;
        }
    }
    api_lock(d);
    struct vq *q = &d->vq[index];
    int *slot = kick ? &q->kick_fd : &q->call_fd;
    int rc = 0;
    if (kick && nfd >= 0) {
        rc = epoll_add(d->ep, nfd, EV_DATA(EV_KICK, index));
    }
    if (rc) {
        close(nfd);
    } else {
        if (*slot >= 0) {
            if (kick) {
                epoll_ctl(d->ep, EPOLL_CTL_DEL, *slot, NULL);
            }
            close(*slot);
        }
        *slot = nfd;
    }
    api_unlock_wake(d, !rc && kick);
    return rc;
}

int sim_set_vring_kick(struct sim_dev *d, uint32_t index, int fd) { return set_vring_fd(d, index, fd, true); }

int sim_set_vring_call(struct sim_dev *d, uint32_t index, int fd) { return set_vring_fd(d, index, fd, false); }

int sim_set_vring_enable(struct sim_dev *d, uint32_t index, int enable, int start_now)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    api_lock(d);
    struct vq *q = &d->vq[index];
    if (enable) {
        q->enabled = true;
        if (d->driver_ok && start_now) {
            q->started = true;
        }
    } else {
        q->enabled = q->started = false;
        /* disabling is how a driver takes a faulted queue back: forget the error */
        q->has_error = false;
        q->error[0] = '\0';
    }
    /* only a vq that starts has work to look for; a stopped one is skipped by the next round anyway */
    api_unlock_wake(d, enable && q->started);
    return 0;
}

int sim_iotlb_update(struct sim_dev *d, uint32_t asid, uint64_t iova, uint64_t size, uint64_t uaddr, uint32_t perm)
{
    if (asid >= d->p.nas || size == 0 || iova + size - 1 < iova || uaddr + size - 1 < uaddr || perm < 1 ||
        perm > 3) {
        return -EINVAL;
    }
    uint64_t last = iova + size - 1;
    int rc = 0;
    api_lock(d);
    struct iotlb *t = iotlb_target(d, asid, &rc);
    if (t != NULL) {
        uint32_t i = iotlb_lower(t, iova);
        if (i < t->n && t->m[i].iova <= last) {
            rc = -EEXIST;
        } else if ((rc = iotlb_reserve(t, t->n + 1, d->p.max_iotlb_entries)) == 0) {
            memmove(&t->m[i + 1], &t->m[i], (size_t)(t->n - i) * sizeof *t->m);
            t->m[i] = (struct map){.iova = iova, .last = last, .uaddr = uaddr, .perm = perm};
            t->n++;
            if (!d->in_batch) {
                d->iotlb_gen++;
            }
        }
    }
    api_unlock_wake(d, !rc); /* a vq that faulted on a missing map may go on */
    return rc;
}

int sim_iotlb_invalidate(struct sim_dev *d, uint32_t asid, uint64_t iova, uint64_t size)
{
    if (asid >= d->p.nas || size == 0 || iova + size - 1 < iova) {
        return -EINVAL;
    }
    uint64_t last = iova + size - 1;
    int rc = 0;
    api_lock(d);
    struct iotlb *t = iotlb_target(d, asid, &rc);
    if (t != NULL) {
        /* like vhost_iotlb_del_range: every map intersecting the range goes away whole */
        uint32_t i = iotlb_lower(t, iova);
        uint32_t j = i;
        while (j < t->n && t->m[j].iova <= last) {
            j++;
        }
        if (j > i) {
            memmove(&t->m[i], &t->m[j], (size_t)(t->n - j) * sizeof *t->m);
            t->n -= j - i;
            if (!d->in_batch) {
                d->iotlb_gen++;
            }
        }
    }
    api_unlock(d);
    return rc;
}

int sim_iotlb_batch_begin(struct sim_dev *d)
{
    api_lock(d);
    d->in_batch = true;
    api_unlock(d);
    return 0;
}

int sim_iotlb_batch_end(struct sim_dev *d)
{
    api_lock(d);
    if (d->in_batch) {
        for (uint32_t a = 0; a < SIM_MAX_AS; a++) {
            if (d->staged[a]) {
                struct iotlb tmp = d->live[a];
                d->live[a] = d->stage[a];
                d->stage[a] = tmp;
                d->stage[a].n = 0;
                d->staged[a] = false;
            }
        }
        d->in_batch = false;
        d->iotlb_gen++;
    }
    api_unlock_wake(d, true);
    return 0;
}

int sim_iotlb_count(struct sim_dev *d, uint32_t asid, uint32_t *count)
{
    if (asid >= d->p.nas) {
        return -EINVAL;
    }
    api_lock(d);
    *count = d->live[asid].n;
    api_unlock(d);
    return 0;
}

int sim_vq_stats(struct sim_dev *d, uint32_t index, struct sim_vq_stats *out)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    api_lock(d);
    const struct vq *q = &d->vq[index];
    out->packets = q->packets;
    out->bytes = q->bytes;
    out->kicks = q->kicks;
    out->calls = q->calls;
    out->faults = q->faults;
    out->dropped = q->dropped;
    out->waits = q->waits;
    out->has_error = q->has_error;
    memcpy(out->error, q->error, sizeof out->error);
    api_unlock(d);
    return 0;
}

int sim_take_fault(struct sim_dev *d, struct sim_fault *out)
{
    int got = 0;
    api_lock(d);
    if (d->fault_count) {
        *out = d->faults[d->fault_head];
        d->fault_head = (d->fault_head + 1) % SIM_FAULT_QUEUE;
        d->fault_count--;
        got = 1;
    }
    api_unlock(d);
    return got;
}

int sim_filter_state(struct sim_dev *d, struct sim_filter *out)
{
    api_lock(d);
    *out = d->filt;
    memcpy(out->mac, d->config, 6);
    api_unlock(d);
    return 0;
}

int sim_rounds(struct sim_dev *d, uint64_t *out)
{
    api_lock(d);
    *out = d->rounds;
    api_unlock(d);
    return 0;
}

/* ---------- fault injection (tests only) ---------- */

int sim_inject_fault(struct sim_dev *d, uint32_t index, uint32_t kind)
{
    if (index >= d->nvqs) {
        return -ENOBUFS;
    }
    if (kind != SIM_INJECT_CLEAR && kind != SIM_INJECT_IOTLB_MISS && kind != SIM_INJECT_STUCK) {
        return -EINVAL;
    }
    api_lock(d);
    struct vq *q = &d->vq[index];
    if (kind == SIM_INJECT_CLEAR) {
        q->inject_miss = false;
        q->stuck = false;
    } else if (kind == SIM_INJECT_IOTLB_MISS) {
        q->inject_miss = true;
    } else {
        q->stuck = true;
    }
    api_unlock(d);
    /* a cleared vq may have work waiting */
    wake(d);
    return 0;
}
