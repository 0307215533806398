/*
 * txgen: the guest side of a virtio-net device at C speed, for the benchmarks (bench/cdriver.py).
 *
 * A split-virtqueue *driver* over rings that live in a caller-owned mapping (a memfd shared with the device or
 * with vduproxy): it plays what DPDK's virtio-user does in testpmd's txonly mode, so the proxy and the software
 * device can be measured with a front-end whose control plane is the project's Python VhostUserFrontend.
 *
 * - tx mode: the TX ring is kept full of descriptors pointing at pre-built frames (virtio_net_hdr + an
 *   Ethernet/IPv4/UDP frame, like testpmd txonly); used entries are recycled in bursts; the device is kicked
 *   through the kick eventfd only when it asks for it (avail_event with EVENT_IDX, else !VRING_USED_F_NO_NOTIFY).
 *   Counted: TX chains the device completed.
 * - loop mode (a loopback device): the RX ring is kept stocked with buffers as well, and frames that come back
 *   are counted (and a sample of them compared byte for byte with the frame that was sent).
 *
 * Descriptors are static (descriptor i is buffer slot i), so the hot loop only writes avail entries.
 * Interrupts are suppressed (the loop busy-polls, like testpmd): NO_INTERRUPT without EVENT_IDX, a used_event
 * kept out of reach with it. No threads, no global state; every value the device writes (used ids and lengths)
 * is checked before use, and a device that breaks the ring rules stops the run with an error message.
 *
 * Memory ordering: ring fields are accessed through C11 atomics on naturally aligned 16/32-bit fields; the
 * avail index is published with a release store, and a sequentially consistent fence separates that store from
 * reading the device's notification suppression (the classic virtio store-load race).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "txgen assumes a little-endian host (virtio 1.x rings are little endian)"
#endif

#define TXGEN_ABI_VERSION 1
#define TXGEN_MAX_NUM 32768u
#define TXGEN_MIN_FRAME 60u   /* ETH_ZLEN: room for the headers and the payload tag */
#define TXGEN_MAX_FRAME 65000u
#define TXGEN_ERR_LEN 160

#define DESC_SIZE 16u
#define DESC_F_WRITE 2u
#define USED_F_NO_NOTIFY 1u
#define AVAIL_F_NO_INTERRUPT 1u

#define ETH_HLEN 14u
#define IP_HLEN 20u
#define UDP_HLEN 8u
#define PAYLOAD_OFF (ETH_HLEN + IP_HLEN + UDP_HLEN)
#define TAG_MAGIC 0x76647570u /* "vdup" */
#define CLOCK_EVERY 64u       /* polls between two clock reads */

/* ---- public structs (bench/_txgen_build.py reads them from here into the cffi cdef) ------------------- */
/* cdef-begin */

struct txgen_ring_params {
    uint64_t desc_off;  /* offsets of the ring parts inside the mapping */
    uint64_t avail_off;
    uint64_t used_off;
    int kick_fd;        /* eventfd the device waits on */
};

struct txgen_params {
    uint8_t *mem;        /* the caller's mapping of the shared memory */
    uint64_t mem_size;
    uint32_t num;        /* ring size (both rings), a power of two */
    uint32_t event_idx;  /* VIRTIO_F_EVENT_IDX negotiated */
    uint32_t loop;       /* 0: tx mode; 1: loop mode (RX ring stocked, RX frames counted) */
    uint32_t hdr_len;    /* virtio_net_hdr length: 12 (VERSION_1 / MRG_RXBUF) or 10 */
    uint32_t frame_len;  /* Ethernet frame bytes, without FCS (testpmd's txpkts) */
    uint32_t burst;      /* recycle / repost only when at least this many entries are free (DPDK: 32) */
    uint32_t verify_every; /* loop: compare every Nth RX frame with what was sent (0: never) */
    struct txgen_ring_params tx;
    struct txgen_ring_params rx; /* loop mode only */
    uint64_t tx_buf_off;  /* num slots of tx_slot bytes: where the frames are here ... */
    uint64_t tx_buf_gpa;  /* ... and to the device */
    uint64_t rx_buf_off;
    uint64_t rx_buf_gpa;
    uint32_t tx_slot;
    uint32_t rx_slot;
    uint8_t dst_mac[6];
    uint8_t src_mac[6];
};

struct txgen_stats {
    uint64_t tx_packets;      /* TX chains the device returned */
    uint64_t rx_packets;      /* loop: RX buffers the device filled */
    uint64_t tx_kicks;
    uint64_t tx_kicks_suppressed;
    uint64_t rx_kicks;
    uint64_t rx_kicks_suppressed;
    uint64_t rx_verified;     /* sampled RX frames equal, byte for byte, to the TX frame they carry the tag of */
    uint64_t rx_mismatch;     /* sampled RX frames that differ (or carry no valid tag) */
    uint64_t rx_bad_len;      /* RX frames whose used length is not hdr_len + frame_len */
    uint64_t polls;
    uint64_t empty_polls;     /* polls that found nothing to reclaim */
    uint64_t busy_ns;         /* time spent inside txgen_run */
};

struct txgen_result {
    uint64_t packets;  /* what this run counted: TX completions (tx) or RX frames (loop) */
    uint64_t tx_packets;
    uint64_t rx_packets;
    uint64_t elapsed_ns;
};

/* cdef-end */

/* ---- private state --------------------------------------------------------------------------------------- */

struct ring {
    uint32_t num, mask;
    uint8_t *desc, *avail, *used;
    uint16_t avail_idx;  /* next index we publish */
    uint16_t last_used;  /* next used entry we read */
    uint16_t used_event; /* what we last wrote to used_event (EVENT_IDX) */
    int kick_fd;
    uint32_t nfree;
    uint16_t *free;      /* descriptor ids we own */
    uint8_t *inflight;   /* 1 while the device owns descriptor id */
    uint64_t *kicks, *suppressed;
};

struct txgen {
    struct txgen_params p;
    struct ring tx, rx;
    struct txgen_stats st;
    bool started;
    bool failed;
    char err[TXGEN_ERR_LEN];
};

/* ---- helpers ---------------------------------------------------------------------------------------------- */

static uint16_t ld16_acquire(const uint8_t *p)
{
    return atomic_load_explicit((const _Atomic uint16_t *)(const void *)p, memory_order_acquire);
}
static uint16_t ld16(const uint8_t *p)
{
    return atomic_load_explicit((const _Atomic uint16_t *)(const void *)p, memory_order_relaxed);
}
static uint32_t ld32(const uint8_t *p)
{
    return atomic_load_explicit((const _Atomic uint32_t *)(const void *)p, memory_order_relaxed);
}
static void st16(uint8_t *p, uint16_t v)
{
    atomic_store_explicit((_Atomic uint16_t *)(void *)p, v, memory_order_relaxed);
}
static void st16_release(uint8_t *p, uint16_t v)
{
    atomic_store_explicit((_Atomic uint16_t *)(void *)p, v, memory_order_release);
}
static void put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_le32(uint8_t *p, uint32_t v) { put_le16(p, (uint16_t)v); put_le16(p + 2, (uint16_t)(v >> 16)); }
static void put_le64(uint8_t *p, uint64_t v) { put_le32(p, (uint32_t)v); put_le32(p + 4, (uint32_t)(v >> 32)); }
static void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put_be32(uint8_t *p, uint32_t v) { put_be16(p, (uint16_t)(v >> 16)); put_be16(p + 2, (uint16_t)v); }
static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static bool is_pow2(uint32_t n) { return n && !(n & (n - 1)); }

/* [off, off + len) inside a mapping of `size` bytes, without overflow */
static bool inside(uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; }

static int fail(struct txgen *g, int rc, const char *what)
{
    g->failed = true;
    snprintf(g->err, sizeof g->err, "%s", what);
    return rc;
}

/* virtio's vring_need_event: did [old, new) cross the index the other side asked to hear about? */
static bool need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---- frames ----------------------------------------------------------------------------------------------- */

static uint16_t ip_checksum(const uint8_t *h, size_t len)
{
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2) {
        sum += (uint32_t)h[i] << 8 | h[i + 1];
    }
    while (sum >> 16) {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    return (uint16_t)~sum;
}

static uint8_t pattern(uint32_t slot, uint32_t i) { return (uint8_t)(slot * 131u + i * 7u + 0x5au); }

/* testpmd txonly's frame: Ethernet, IPv4 198.18.0.1 → 198.18.0.2, UDP 9 → 9; the payload starts with a tag
 * (slot number, magic) so a frame coming back can be matched with the one that was sent. */
static void build_frame(const struct txgen_params *p, uint32_t slot, uint8_t *f)
{
    uint32_t n = p->frame_len;
    memcpy(f, p->dst_mac, 6);
    memcpy(f + 6, p->src_mac, 6);
    put_be16(f + 12, 0x0800);
    uint8_t *ip = f + ETH_HLEN;
    memset(ip, 0, IP_HLEN);
    ip[0] = 0x45;
    put_be16(ip + 2, (uint16_t)(n - ETH_HLEN));
    put_be16(ip + 4, (uint16_t)slot);
    ip[8] = 64;
    ip[9] = 17;
    static const uint8_t src_ip[4] = {198, 18, 0, 1}, dst_ip[4] = {198, 18, 0, 2};
    memcpy(ip + 12, src_ip, 4);
    memcpy(ip + 16, dst_ip, 4);
    put_be16(ip + 10, ip_checksum(ip, IP_HLEN));
    uint8_t *udp = ip + IP_HLEN;
    put_be16(udp, 9);
    put_be16(udp + 2, 9);
    put_be16(udp + 4, (uint16_t)(n - ETH_HLEN - IP_HLEN));
    put_be16(udp + 6, 0); /* no UDP checksum (allowed over IPv4), as testpmd txonly */
    put_be32(f + PAYLOAD_OFF, slot);
    put_be32(f + PAYLOAD_OFF + 4, TAG_MAGIC);
    for (uint32_t i = PAYLOAD_OFF + 8; i < n; i++) {
        f[i] = pattern(slot, i);
    }
}

/* ---- rings ------------------------------------------------------------------------------------------------ */

static int ring_init(struct txgen *g, struct ring *r, const struct txgen_ring_params *rp, const char *name,
                     uint64_t *kicks, uint64_t *suppressed)
{
    const struct txgen_params *p = &g->p;
    uint64_t num = p->num;
    /* virtio 1.x alignment: descriptors 16, avail 2, used 4 */
    if (!inside(rp->desc_off, DESC_SIZE * num, p->mem_size) || rp->desc_off % 16 ||
        !inside(rp->avail_off, 6 + 2 * num, p->mem_size) || rp->avail_off % 2 ||
        !inside(rp->used_off, 6 + 8 * num, p->mem_size) || rp->used_off % 4) {
        char msg[TXGEN_ERR_LEN];
        snprintf(msg, sizeof msg, "%s ring parts are misaligned or outside the mapping", name);
        return fail(g, -EINVAL, msg);
    }
    if (rp->kick_fd < 0) {
        char msg[TXGEN_ERR_LEN];
        snprintf(msg, sizeof msg, "%s ring has no kick eventfd", name);
        return fail(g, -EINVAL, msg);
    }
    r->num = p->num;
    r->mask = p->num - 1;
    r->desc = p->mem + rp->desc_off;
    r->avail = p->mem + rp->avail_off;
    r->used = p->mem + rp->used_off;
    r->kick_fd = rp->kick_fd;
    r->kicks = kicks;
    r->suppressed = suppressed;
    r->free = calloc(num, sizeof *r->free);
    r->inflight = calloc(num, 1);
    if (!r->free || !r->inflight) {
        return fail(g, -ENOMEM, "out of memory");
    }
    return 0;
}

static void ring_free(struct ring *r)
{
    free(r->free);
    free(r->inflight);
    r->free = NULL;
    r->inflight = NULL;
}

/* Descriptor i = buffer slot i, forever; every id starts free. The ring indices start from what is in memory
 * (a fresh ring: 0), so a front-end that set SET_VRING_BASE to the used index agrees with the device. */
static int ring_reset(struct txgen *g, struct ring *r, uint64_t buf_gpa, uint32_t slot, uint32_t len,
                      uint16_t flags)
{
    for (uint32_t i = 0; i < r->num; i++) {
        uint8_t *d = r->desc + (size_t)i * DESC_SIZE;
        put_le64(d, buf_gpa + (uint64_t)i * slot);
        put_le32(d + 8, len);
        put_le16(d + 12, flags);
        put_le16(d + 14, 0);
        r->inflight[i] = 0;
        r->free[i] = (uint16_t)(r->num - 1 - i); /* popped from the end: ids go out in order 0, 1, 2, ... */
    }
    r->nfree = r->num;
    r->avail_idx = ld16(r->avail + 2);
    r->last_used = ld16(r->used + 2);
    if (r->avail_idx != r->last_used) {
        /* buffers of an earlier driver still in flight: which ids the device holds is unknown */
        return fail(g, -EBUSY, "the ring has buffers in flight (avail index != used index)");
    }
    if (g->p.event_idx) {
        st16(r->avail, 0);
        r->used_event = (uint16_t)(r->last_used + 0x8000u);
        st16(r->avail + 4 + 2 * (size_t)r->num, r->used_event);
    } else {
        st16(r->avail, AVAIL_F_NO_INTERRUPT);
    }
    return 0;
}

static int kick(struct txgen *g, struct ring *r)
{
    uint64_t one = 1;
    ssize_t n = write(r->kick_fd, &one, sizeof one);
    if (n != (ssize_t)sizeof one && !(n < 0 && errno == EAGAIN)) {
        return fail(g, -EIO, "writing the kick eventfd failed");
    }
    (*r->kicks)++;
    return 0;
}

/* Publish everything we own (when at least `min` ids are free), kicking if the device asks for it. */
static int ring_post(struct txgen *g, struct ring *r, uint32_t min)
{
    if (r->nfree < min || !r->nfree) {
        return 0;
    }
    uint16_t old = r->avail_idx;
    while (r->nfree) {
        uint16_t id = r->free[--r->nfree];
        r->inflight[id] = 1;
        st16(r->avail + 4 + 2 * (size_t)(r->avail_idx & r->mask), id);
        r->avail_idx++;
    }
    st16_release(r->avail + 2, r->avail_idx);
    atomic_thread_fence(memory_order_seq_cst);
    bool notify;
    if (g->p.event_idx) {
        notify = need_event(ld16(r->used + 4 + 8 * (size_t)r->num), r->avail_idx, old);
    } else {
        notify = !(ld16(r->used) & USED_F_NO_NOTIFY);
    }
    if (notify) {
        return kick(g, r);
    }
    (*r->suppressed)++;
    return 0;
}

static void verify_rx(struct txgen *g, const uint8_t *buf, uint32_t len)
{
    const struct txgen_params *p = &g->p;
    if (len < p->hdr_len + PAYLOAD_OFF + 8) {
        g->st.rx_mismatch++;
        return;
    }
    const uint8_t *f = buf + p->hdr_len;
    uint32_t slot = get_be32(f + PAYLOAD_OFF);
    if (slot >= p->num || get_be32(f + PAYLOAD_OFF + 4) != TAG_MAGIC || len != p->hdr_len + p->frame_len) {
        g->st.rx_mismatch++;
        return;
    }
    const uint8_t *sent = p->mem + p->tx_buf_off + (uint64_t)slot * p->tx_slot + p->hdr_len;
    if (memcmp(f, sent, p->frame_len)) {
        g->st.rx_mismatch++;
    } else {
        g->st.rx_verified++;
    }
}

/* Take back what the device used; returns how many entries, or a negative error. */
static int ring_reclaim(struct txgen *g, struct ring *r, bool rx)
{
    uint16_t used_idx = ld16_acquire(r->used + 2);
    uint16_t n = (uint16_t)(used_idx - r->last_used);
    if (!n) {
        return 0;
    }
    if (n > r->num) {
        return fail(g, -EPROTO, rx ? "device moved the RX used index by more than the ring size"
                                   : "device moved the TX used index by more than the ring size");
    }
    const struct txgen_params *p = &g->p;
    for (uint16_t i = 0; i < n; i++) {
        const uint8_t *e = r->used + 4 + 8 * (size_t)((uint16_t)(r->last_used + i) & r->mask);
        uint32_t id = ld32(e);
        uint32_t len = ld32(e + 4);
        if (id >= r->num || !r->inflight[id]) {
            char msg[TXGEN_ERR_LEN];
            snprintf(msg, sizeof msg, "device returned %s id %u that it does not own", rx ? "RX" : "TX", id);
            return fail(g, -EPROTO, msg);
        }
        if (rx) {
            if (len > p->rx_slot) {
                return fail(g, -EPROTO, "device claims more RX bytes than the buffer holds");
            }
            if (len != p->hdr_len + p->frame_len) {
                g->st.rx_bad_len++;
            }
            if (p->verify_every && g->st.rx_packets % p->verify_every == 0) {
                verify_rx(g, p->mem + p->rx_buf_off + (uint64_t)id * p->rx_slot, len);
            }
            g->st.rx_packets++;
        } else {
            g->st.tx_packets++;
        }
        r->inflight[id] = 0;
        r->free[r->nfree++] = (uint16_t)id;
    }
    r->last_used = used_idx;
    if (p->event_idx && (uint16_t)(r->used_event - r->last_used) <= r->num) {
        /* keep used_event out of reach of the used index: no call for a busy-polling driver */
        r->used_event = (uint16_t)(r->last_used + 0x8000u);
        st16(r->avail + 4 + 2 * (size_t)r->num, r->used_event);
    }
    return n;
}

/* ---- API -------------------------------------------------------------------------------------------------- */

int txgen_abi_version(void) { return TXGEN_ABI_VERSION; }

const char *txgen_error(const struct txgen *g) { return g ? g->err : "no driver"; }

void txgen_destroy(struct txgen *g)
{
    if (!g) {
        return;
    }
    ring_free(&g->tx);
    ring_free(&g->rx);
    free(g);
}

/* Validate the parameters and build the frames. On error with *out set, txgen_error says why; the caller
 * destroys it either way. */
int txgen_create(const struct txgen_params *p, struct txgen **out)
{
    if (!p || !out) {
        return -EINVAL;
    }
    *out = NULL;
    struct txgen *g = calloc(1, sizeof *g);
    if (!g) {
        return -ENOMEM;
    }
    *out = g;
    g->p = *p;
    if (!p->mem || !p->mem_size) {
        return fail(g, -EINVAL, "no memory");
    }
    if (!is_pow2(p->num) || p->num > TXGEN_MAX_NUM) {
        return fail(g, -EINVAL, "ring size is not a power of two <= 32768");
    }
    if (p->hdr_len != 10 && p->hdr_len != 12) {
        return fail(g, -EINVAL, "virtio_net_hdr length must be 10 or 12");
    }
    if (p->frame_len < TXGEN_MIN_FRAME || p->frame_len > TXGEN_MAX_FRAME) {
        return fail(g, -EINVAL, "frame length outside [60, 65000]");
    }
    if ((uint64_t)p->hdr_len + p->frame_len > p->tx_slot) {
        return fail(g, -EINVAL, "TX slot smaller than header + frame");
    }
    if (!inside(p->tx_buf_off, (uint64_t)p->num * p->tx_slot, p->mem_size)) {
        return fail(g, -EINVAL, "TX buffers outside the mapping");
    }
    if (p->burst == 0 || p->burst > p->num) {
        g->p.burst = p->num < 32 ? p->num : 32;
    }
    int rc = ring_init(g, &g->tx, &p->tx, "TX", &g->st.tx_kicks, &g->st.tx_kicks_suppressed);
    if (rc) {
        return rc;
    }
    if (p->loop) {
        /* a frame must fit one RX buffer: mergeable RX never needs a second one */
        if ((uint64_t)p->hdr_len + p->frame_len > p->rx_slot) {
            return fail(g, -EINVAL, "RX slot smaller than header + frame");
        }
        if (!inside(p->rx_buf_off, (uint64_t)p->num * p->rx_slot, p->mem_size)) {
            return fail(g, -EINVAL, "RX buffers outside the mapping");
        }
        rc = ring_init(g, &g->rx, &p->rx, "RX", &g->st.rx_kicks, &g->st.rx_kicks_suppressed);
        if (rc) {
            return rc;
        }
    }
    for (uint32_t i = 0; i < p->num; i++) {
        uint8_t *slot = p->mem + p->tx_buf_off + (uint64_t)i * p->tx_slot;
        memset(slot, 0, p->hdr_len); /* no offloads: an all-zero virtio_net_hdr */
        build_frame(p, i, slot + p->hdr_len);
    }
    return 0;
}

/* Lay out the descriptors and hand the device every buffer (kicking as it asks). Call once, after the device
 * was given the rings (DRIVER_OK) and before txgen_run. */
int txgen_start(struct txgen *g)
{
    if (!g || g->failed) {
        return -EINVAL;
    }
    if (g->started) {
        return -EALREADY;
    }
    const struct txgen_params *p = &g->p;
    int rc = ring_reset(g, &g->tx, p->tx_buf_gpa, p->tx_slot, p->hdr_len + p->frame_len, 0);
    if (!rc && p->loop) {
        rc = ring_reset(g, &g->rx, p->rx_buf_gpa, p->rx_slot, p->rx_slot, DESC_F_WRITE);
    }
    if (rc) {
        return rc;
    }
    g->started = true;
    rc = p->loop ? ring_post(g, &g->rx, 1) : 0;
    return rc ? rc : ring_post(g, &g->tx, 1);
}

/* Busy-poll for `seconds`: reclaim, verify, repost, kick when asked. Returns what it counted (TX completions in
 * tx mode, RX frames in loop mode) or a negative errno (txgen_error says why). */
int64_t txgen_run(struct txgen *g, double seconds, struct txgen_result *res)
{
    if (!g || !g->started || g->failed || !(seconds >= 0) || seconds > 1e6) {
        return -EINVAL;
    }
    const bool loop = g->p.loop != 0;
    const uint32_t burst = g->p.burst;
    const uint64_t tx0 = g->st.tx_packets, rx0 = g->st.rx_packets;
    const uint64_t t0 = now_ns();
    const uint64_t deadline = t0 + (uint64_t)(seconds * 1e9);
    uint64_t t = t0;
    uint32_t tick = 0;
    int rc = 0;
    /* whatever is free from a previous run (or the gap between two) goes out first */
    if (loop) {
        rc = ring_post(g, &g->rx, 1);
    }
    if (!rc) {
        rc = ring_post(g, &g->tx, 1);
    }
    while (!rc) {
        int got = 0;
        if (loop) {
            got = ring_reclaim(g, &g->rx, true);
            if (got < 0) {
                rc = got;
                break;
            }
            rc = ring_post(g, &g->rx, burst);
            if (rc) {
                break;
            }
        }
        int sent = ring_reclaim(g, &g->tx, false);
        if (sent < 0) {
            rc = sent;
            break;
        }
        rc = ring_post(g, &g->tx, burst);
        g->st.polls++;
        if (!got && !sent) {
            g->st.empty_polls++;
        }
        if (++tick >= CLOCK_EVERY) {
            tick = 0;
            t = now_ns();
            if (t >= deadline) {
                break;
            }
        }
    }
    t = now_ns();
    g->st.busy_ns += t - t0;
    uint64_t tx = g->st.tx_packets - tx0, rx = g->st.rx_packets - rx0;
    if (res) {
        res->tx_packets = tx;
        res->rx_packets = rx;
        res->packets = loop ? rx : tx;
        res->elapsed_ns = t - t0;
    }
    if (rc) {
        return rc;
    }
    return (int64_t)(loop ? rx : tx);
}

void txgen_get_stats(const struct txgen *g, struct txgen_stats *out)
{
    if (g && out) {
        *out = g->st;
    }
}
