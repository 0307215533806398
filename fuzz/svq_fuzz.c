/*
 * libFuzzer harness for the SVQ core (vduproxy/svq_core.c) with hostile guest rings and a hostile device.
 *
 * Each input is a small program: a configuration header, then operations that play a guest (write descriptors,
 * indirect tables, avail entries and indices anywhere, race its own ring against the core thread) and a device
 * (pop shadow chains, read and write through them, complete them honestly or with made-up used entries), with
 * polls, drains, log switches, region changes and re-attaches in between. Built with ASan + UBSan
 * (fuzz/run_svq.sh); guest memory, the shadow ring parts and the dirty log are separate exact-size heap blocks, so
 * any access outside them is a sanitizer report.
 *
 * Beyond memory safety the harness traps (abort) when the core breaks a contract:
 *  - a shadow descriptor, or a passed-through indirect table, points outside the guest memory table;
 *  - a shadow chain loops, is longer than the ring, has unknown flags, or a shadow avail head is out of range;
 *  - a poll publishes a different number of shadow chains than guest entries it consumed;
 *  - the core's counters disagree (inflight vs guest and shadow indices) on a vq that is not broken;
 *  - with an honest device and an untouched used ring, the guest used entries are not exactly the completed
 *    chains (guest head, length clamped to the chain's writable bytes), or a drain fails or hands back a base
 *    that is not the guest's used index;
 *  - the core leaks a file descriptor.
 *
 * The harness's own state lives in the per-input `struct h`; the few fds shared by every input are created once.
 */
#define _GNU_SOURCE
#include "svq_core.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define GPA0 0x100000ull
#define REG 0x8000u /* two regions of 32 KiB: A at GPA0, B right after it */
#define MEM (2u * REG)
#define SHIFT 0x7f0000000000ull
#define GAP 0x10000000ull
#define MAX_NUM 512u
#define MAX_OPS 256
#define MAX_EXPECT 4096
#define F_NEXT 1
#define F_WRITE 2
#define F_IND 4

#define TRAP(...)                                                                                                \
    do {                                                                                                         \
        fprintf(stderr, "svq_fuzz: contract violated at line %d: ", __LINE__);                                   \
        fprintf(stderr, __VA_ARGS__);                                                                            \
        fputc('\n', stderr);                                                                                     \
        abort();                                                                                                 \
    } while (0)

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct in {
    const uint8_t *p;
    size_t n;
};

static uint8_t u8(struct in *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}
static uint16_t u16(struct in *in) { return (uint16_t)(u8(in) | u8(in) << 8); }
static uint32_t u32(struct in *in) { return (uint32_t)u16(in) | (uint32_t)u16(in) << 16; }
static uint64_t u64(struct in *in) { return (uint64_t)u32(in) | (uint64_t)u32(in) << 32; }

/* What the device was told about one chain when the core published it. */
struct shadow_info {
    uint16_t guest_head;
    uint64_t wlen;
    bool known; /* published while the harness could read the guest's view of it */
    bool injected; /* a proxy frame: never completed toward the guest */
};

struct expect {
    uint16_t id;
    uint32_t len;
};

struct h {
    svq_t *s;
    uint8_t *mem[2]; /* region A and B, each exactly REG bytes */
    struct svq_region map[2]; /* how the device sees guest memory: both regions, always */
    struct svq_region table[2]; /* what the core was last given */
    uint32_t ntable;
    bool identity, iova_adjacent;
    uint32_t num, gflags, dflags;
    uint64_t desc_gpa, avail_gpa, used_gpa, log_used_gpa;
    uint8_t *sdesc, *savail, *sused; /* shadow ring parts, exact sizes */
    uint8_t *log;
    uint64_t log_size;
    int call_fd;
    bool guest_attached, shadow_attached;
    /* guest model */
    uint16_t g_avail;
    /* device model */
    uint16_t dev_avail, dev_used, validated;
    struct shadow_info info[MAX_NUM];
    /* `exact` holds while the guest left its used ring alone, the device was honest and nothing raced */
    bool exact;
    struct expect exp[MAX_EXPECT];
    uint32_t nexp, exp_done;
    uint16_t g_used_seen;
    /* proxy frames (svq_inject_tx) in flight, as long as no hostile device op made the count unknowable */
    uint32_t inj_inflight, inj_completed; /* completed: by the device, not yet seen by the core */
    bool inj_known;
    uint8_t *inj;
    uint64_t inj_size;
};

#define INJ_IOVA 0x7e0000000000ull

/* Shared by every input: eventfds the core dups (and must close again) and a pipe nobody reads. */
static int efd_err = -1, efd_kick = -1, efd_call = -1, efd_dkick = -1, efd_dcall = -1, pipe_w = -1;
static bool selftest, verbose;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN); /* as the daemon does */
    efd_err = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    efd_kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    efd_call = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    efd_dkick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    efd_dcall = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int p[2];
    if (pipe(p) == 0) {
        close(p[0]);
        pipe_w = p[1];
    }
    /* proves the checks and the CI wrapper catch a violation: the device believes no guest memory exists */
    selftest = getenv("SVQ_FUZZ_SELFTEST") != NULL;
    /* one line per input with the vq's final error: which hostile paths a corpus reaches */
    verbose = getenv("SVQ_FUZZ_VERBOSE") != NULL;
    if (efd_err < 0 || efd_kick < 0 || efd_call < 0 || efd_dkick < 0 || efd_dcall < 0 || pipe_w < 0) {
        fprintf(stderr, "svq_fuzz: cannot create fds\n");
        exit(2);
    }
    return 0;
}

static uint16_t rd16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE); }
static void wr16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE); }

static size_t avail_bytes(uint32_t num) { return 6 + 2u * num; }
static size_t used_bytes(uint32_t num) { return 6 + 8u * num; }

/* Local pointer to guest bytes [gpa, gpa+len) when they lie in one region (the harness as the guest). */
static uint8_t *gptr(struct h *h, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < 2; i++) {
        uint64_t base = GPA0 + (uint64_t)i * REG;
        if (gpa >= base && gpa - base < REG && len <= REG - (gpa - base))
            return h->mem[i] + (gpa - base);
    }
    return NULL;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Any guest write that lands on the guest used ring ends exact checking: the guest scribbled on it. */
static void guest_wrote(struct h *h, uint64_t gpa, uint64_t len)
{
    if (overlaps(gpa, len, h->used_gpa, used_bytes(h->num)))
        h->exact = false;
}

static void gwrite(struct h *h, uint64_t gpa, const void *src, size_t len)
{
    uint8_t *p = gptr(h, gpa, len);
    if (p) {
        memcpy(p, src, len);
        guest_wrote(h, gpa, len);
    }
}

/* IOVA -> local through a region list; whole range inside, regions joined when adjacent in IOVA and GPA. */
static bool iova_walk(const struct svq_region *t, uint32_t n, uint64_t iova, uint64_t len, uint8_t *buf,
                      bool write, struct h *h)
{
    if (iova > UINT64_MAX - len)
        return false;
    while (len) {
        const struct svq_region *r = NULL;
        for (uint32_t i = 0; i < n; i++)
            if (iova >= t[i].iova && iova - t[i].iova < t[i].size)
                r = &t[i];
        if (!r)
            return false;
        uint64_t off = iova - r->iova, c = r->size - off < len ? r->size - off : len;
        uint8_t *p = (uint8_t *)(uintptr_t)(r->local + off);
        if (buf && write) {
            memcpy(p, buf, c);
            if (h)
                guest_wrote(h, r->gpa + off, c);
        } else if (buf) {
            memcpy(buf, p, c);
        }
        if (buf)
            buf += c;
        iova += c;
        len -= c;
    }
    return true;
}

/* The contract: what the core gives the device lies inside the memory table the core was last given. */
static bool iova_valid(struct h *h, uint64_t iova, uint64_t len)
{
    if (selftest)
        return false;
    return iova_walk(h->table, h->ntable, iova, len ? len : 1, NULL, false, NULL);
}

/* ---- generators ------------------------------------------------------------------------------------------ */

static uint64_t gen_addr(struct in *in)
{
    uint8_t m = u8(in);
    uint64_t v = u16(in);
    switch (m % 10) {
    case 0:
    case 1:
        return GPA0 + v % MEM;
    case 2:
        return GPA0 + REG - 1 - v % 64; /* end of region A */
    case 3:
        return GPA0 + MEM - 1 - v % 64; /* end of guest memory */
    case 4:
        return GPA0 - 1 - v % 64; /* just below */
    case 5:
        return u64(in);
    case 6:
        return UINT64_MAX - v % 256;
    case 7:
        return GPA0 + (v % (MEM / 16)) * 16;
    case 8:
        return GPA0 + SHIFT + v % MEM; /* an IOVA passed off as a GPA */
    default:
        return v;
    }
}

static uint32_t gen_len(struct in *in)
{
    uint8_t m = u8(in);
    switch (m % 8) {
    case 0:
    case 1:
        return u8(in);
    case 2:
        return u16(in);
    case 3:
        return u32(in);
    case 4:
        return UINT32_MAX - u8(in);
    case 5:
        return 0;
    case 6:
        return 16u * (1u + u8(in) % 8); /* a plausible indirect table */
    default:
        return 16u * u16(in);
    }
}

static void put_desc(struct h *h, uint64_t gpa, struct in *in)
{
    struct desc d = {gen_addr(in), gen_len(in), u8(in), u16(in)};
    if (!(d.flags & 0x80))
        d.flags &= 7; /* mostly known flags, sometimes any */
    if (!(d.next & 0x8000))
        d.next = (uint16_t)(d.next % (h->num + 2));
    gwrite(h, gpa, &d, sizeof(d));
}

/* ---- attach / detach ------------------------------------------------------------------------------------- */

static void free_shadow(struct h *h)
{
    free(h->sdesc);
    free(h->savail);
    free(h->sused);
    h->sdesc = h->savail = h->sused = NULL;
}

static void reset_models(struct h *h, uint16_t guest_base, uint16_t shadow_base)
{
    h->g_avail = guest_base;
    h->dev_avail = h->dev_used = h->validated = shadow_base;
    h->g_used_seen = guest_base;
    memset(h->info, 0, sizeof(h->info));
    h->nexp = h->exp_done = 0;
    h->exact = true;
    h->inj_inflight = h->inj_completed = 0;
    h->inj_known = true;
}

static void attach(struct h *h, uint16_t guest_base, uint16_t shadow_base)
{
    free_shadow(h);
    /* the guest starts with nothing outstanding: used idx == avail idx == the base */
    uint8_t *a = gptr(h, h->avail_gpa, avail_bytes(h->num));
    uint8_t *u = gptr(h, h->used_gpa, used_bytes(h->num));
    if (a)
        wr16(a + 2, guest_base);
    if (u)
        wr16(u + 2, guest_base);
    int rc = svq_attach_guest(h->s, 0, h->num, h->desc_gpa, h->avail_gpa, h->used_gpa, guest_base, efd_kick,
                              h->call_fd, h->gflags, h->log_used_gpa);
    if (rc != 0 && rc != -EFAULT && rc != -EINVAL && rc != -ERANGE && rc != -EIO)
        TRAP("svq_attach_guest returned %d", rc);
    h->guest_attached = rc == 0;
    h->sdesc = malloc(16u * h->num);
    h->savail = malloc(avail_bytes(h->num));
    h->sused = malloc(used_bytes(h->num));
    if (!h->sdesc || !h->savail || !h->sused)
        abort();
    rc = svq_attach_shadow(h->s, 0, h->num, h->sdesc, h->savail, h->sused, shadow_base, efd_dkick, efd_dcall,
                           h->dflags);
    if (rc != 0 && rc != -EIO)
        TRAP("svq_attach_shadow returned %d", rc);
    h->shadow_attached = rc == 0;
    if (verbose)
        fprintf(stderr, "svq_fuzz: attach num %u guest %d shadow %d bases %u %u\n", h->num, h->guest_attached,
                h->shadow_attached, guest_base, shadow_base);
    if (!h->shadow_attached)
        free_shadow(h);
    reset_models(h, guest_base, shadow_base);
}

/* ---- checks ---------------------------------------------------------------------------------------------- */

static bool vq_broken(struct h *h)
{
    struct svq_stats st;
    if (svq_get_stats(h->s, 0, &st) != 0)
        TRAP("svq_get_stats failed");
    return st.broken != 0;
}

static bool live(struct h *h) { return h->guest_attached && h->shadow_attached && !vq_broken(h); }

static void check_counters(struct h *h)
{
    if (!live(h))
        return;
    struct svq_vq_state vs;
    if (svq_get_vq_state(h->s, 0, &vs) != 0)
        TRAP("svq_get_vq_state failed");
    if ((uint16_t)(vs.shadow_avail - vs.shadow_used) != vs.inflight)
        TRAP("shadow avail %u - used %u != inflight %u", vs.shadow_avail, vs.shadow_used, vs.inflight);
    /* chains in flight are the guest's (consumed and not returned) plus the proxy's own frames */
    uint16_t guest_inflight = (uint16_t)(vs.guest_last_avail - vs.guest_used);
    if (h->inj_known ? guest_inflight + h->inj_inflight != vs.inflight : guest_inflight > vs.inflight)
        TRAP("guest last_avail %u - used %u vs inflight %u (%u proxy frames)", vs.guest_last_avail, vs.guest_used,
             vs.inflight, h->inj_inflight);
    if (vs.inflight > h->num)
        TRAP("inflight %u above ring size %u", vs.inflight, h->num);
}

/* Check one newly published shadow chain; returns its writable bytes. `known` = the guest's tables are intact. */
static uint64_t check_chain(struct h *h, uint16_t head, bool known)
{
    if (head >= h->num)
        TRAP("shadow avail head %u not below %u", head, h->num);
    uint64_t wlen = 0;
    uint32_t idx = head;
    for (uint32_t hops = 0;; hops++) {
        if (hops >= h->num)
            TRAP("shadow chain from %u loops or exceeds %u descriptors", head, h->num);
        struct desc d;
        memcpy(&d, h->sdesc + 16u * idx, sizeof(d));
        if (d.flags & ~(F_NEXT | F_WRITE | F_IND))
            TRAP("shadow descriptor %u has flags %#x", idx, d.flags);
        if (d.flags & F_IND) {
            if (!(h->dflags & SVQ_DEV_INDIRECT) || !h->identity)
                TRAP("indirect table passed to a device that cannot read it as is");
            if (idx != head || (d.flags & F_NEXT) || !d.len || d.len % 16)
                TRAP("passed indirect descriptor is not a lone, whole table (len %u flags %#x)", d.len, d.flags);
            if (!iova_valid(h, d.addr, d.len))
                TRAP("indirect table %#llx+%u outside guest memory", (unsigned long long)d.addr, d.len);
            /* the core itself writes the guest used ring (avail_event) after checking a table that overlaps it */
            if (!known || overlaps(d.addr, d.len, h->used_gpa, used_bytes(h->num)))
                return UINT64_MAX;
            uint32_t n = d.len / 16;
            for (uint32_t i = 0, k = 0;; k++) {
                if (k >= n)
                    TRAP("passed indirect table loops");
                struct desc e;
                if (!iova_walk(h->table, h->ntable, d.addr + 16ull * i, 16, (uint8_t *)&e, false, NULL))
                    TRAP("indirect entry unreadable");
                if ((e.flags & F_IND) || !iova_valid(h, e.addr, e.len))
                    TRAP("passed indirect entry %u bad: %#llx+%u flags %#x", i, (unsigned long long)e.addr, e.len,
                         e.flags);
                if (e.flags & F_WRITE)
                    wlen += e.len;
                if (!(e.flags & F_NEXT))
                    break;
                i = e.next;
                if (i >= n)
                    TRAP("passed indirect next %u beyond %u", i, n);
            }
            return wlen;
        }
        if (!iova_valid(h, d.addr, d.len))
            TRAP("shadow descriptor %#llx+%u outside guest memory", (unsigned long long)d.addr, d.len);
        if (d.flags & F_WRITE)
            wlen += d.len;
        if (!(d.flags & F_NEXT))
            return wlen;
        idx = d.next;
        if (idx >= h->num)
            TRAP("shadow next %u not below %u", idx, h->num);
    }
}

/* After a poll: every newly published chain is checked; guest used entries match what the device completed. */
static void check_after_poll(struct h *h, uint16_t la_before, bool raced)
{
    if (!h->shadow_attached)
        return;
    uint16_t pub = rd16(h->savail + 2);
    uint16_t n = (uint16_t)(pub - h->validated);
    if (n > h->num)
        TRAP("shadow avail idx jumped by %u (ring %u)", n, h->num);
    struct svq_vq_state vs;
    svq_get_vq_state(h->s, 0, &vs);
    bool consumed_known = h->guest_attached && !raced;
    if (consumed_known && live(h) && (uint16_t)(vs.guest_last_avail - la_before) != n)
        TRAP("published %u shadow chains for %u guest entries", n, (uint16_t)(vs.guest_last_avail - la_before));
    uint8_t *ga = h->guest_attached ? gptr(h, h->avail_gpa, avail_bytes(h->num)) : NULL;
    for (uint16_t k = 0; k < n; k++) {
        uint16_t pos = (uint16_t)(h->validated + k);
        uint16_t head = rd16(h->savail + 4 + 2u * (pos & (h->num - 1)));
        uint64_t wlen = check_chain(h, head, !raced);
        struct shadow_info *si = &h->info[head];
        si->known = consumed_known && ga && wlen != UINT64_MAX;
        si->injected = false;
        si->wlen = wlen;
        si->guest_head = si->known ? rd16(ga + 4 + 2u * ((uint16_t)(la_before + k) & (h->num - 1))) : 0;
    }
    h->validated = pub;
    if (raced)
        h->exact = false;
    if (!h->exact || !live(h) || !h->guest_attached)
        return;
    uint8_t *gu = gptr(h, h->used_gpa, used_bytes(h->num));
    if (!gu)
        return;
    uint16_t gidx = rd16(gu + 2);
    if (gidx != vs.guest_used)
        TRAP("guest used idx %u in memory, core says %u", gidx, vs.guest_used);
    for (; h->g_used_seen != gidx; h->g_used_seen++) {
        if (h->exp_done >= h->nexp)
            TRAP("guest used entry %u completes nothing the device completed", h->g_used_seen);
        struct expect *e = &h->exp[h->exp_done++];
        uint32_t got[2];
        memcpy(got, gu + 4 + 8u * (h->g_used_seen & (h->num - 1)), sizeof(got));
        if (got[0] != e->id || got[1] != e->len)
            TRAP("guest used entry {%u, %u}, expected {%u, %u}", got[0], got[1], e->id, e->len);
    }
}

/* A poll (or the thread) takes every used entry the device published: completed proxy frames are gone. */
static void used_seen(struct h *h)
{
    h->inj_inflight -= h->inj_completed < h->inj_inflight ? h->inj_completed : h->inj_inflight;
    h->inj_completed = 0;
}

static void poll_once(struct h *h, bool raced)
{
    struct svq_vq_state vs;
    svq_get_vq_state(h->s, 0, &vs);
    int rc = svq_poll(h->s);
    if (rc < 0)
        TRAP("svq_poll returned %d", rc);
    used_seen(h);
    check_after_poll(h, vs.guest_last_avail, raced);
    check_counters(h);
}

/* ---- device ---------------------------------------------------------------------------------------------- */

static void dev_complete(struct h *h, struct in *in)
{
    if (!h->shadow_attached || h->dev_avail == h->validated)
        return;
    uint16_t head = rd16(h->savail + 4 + 2u * (h->dev_avail & (h->num - 1)));
    h->dev_avail++;
    /* read and write through the chain as a device would, within what the device may reach */
    uint8_t scratch[512];
    uint8_t fill = u8(in);
    memset(scratch, fill, sizeof(scratch));
    uint32_t idx = head;
    for (uint32_t hops = 0; hops < h->num; hops++) {
        struct desc d;
        memcpy(&d, h->sdesc + 16u * idx, sizeof(d));
        if (!(d.flags & F_IND)) {
            uint64_t c = d.len < sizeof(scratch) ? d.len : sizeof(scratch);
            iova_walk(h->map, 2, d.addr, c, scratch, d.flags & F_WRITE, h);
        }
        if (!(d.flags & F_NEXT) || d.next >= h->num)
            break;
        idx = d.next;
    }
    const struct shadow_info *si = &h->info[head];
    if (si->injected)
        h->inj_completed++;
    uint32_t len;
    switch (u8(in) % 4) {
    case 0:
        len = si->wlen > UINT32_MAX ? UINT32_MAX : (uint32_t)si->wlen;
        break;
    case 1:
        len = 0;
        break;
    case 2:
        len = u32(in); /* possibly more than the chain holds: the core must clamp */
        break;
    default:
        len = u8(in);
        break;
    }
    uint32_t elem[2] = {head, len};
    memcpy(h->sused + 4 + 8u * (h->dev_used & (h->num - 1)), elem, sizeof(elem));
    h->dev_used++;
    wr16(h->sused + 2, h->dev_used);
    if (si->injected)
        return; /* the core takes it back; the guest never hears of it */
    if (!si->known || h->nexp >= MAX_EXPECT) {
        h->exact = false;
        return;
    }
    uint32_t clamped = (uint64_t)len > si->wlen ? (uint32_t)si->wlen : len;
    h->exp[h->nexp++] = (struct expect){si->guest_head, clamped};
}

static void dev_hostile(struct h *h, struct in *in)
{
    if (!h->shadow_attached)
        return;
    h->exact = false;
    h->inj_known = false;
    switch (u8(in) % 4) {
    case 0: { /* a used entry with any id, published */
        uint32_t elem[2] = {u16(in), u32(in)};
        memcpy(h->sused + 4 + 8u * (h->dev_used & (h->num - 1)), elem, sizeof(elem));
        h->dev_used++;
        wr16(h->sused + 2, h->dev_used);
        break;
    }
    case 1: /* the used index anywhere */
        h->dev_used = u16(in);
        wr16(h->sused + 2, h->dev_used);
        break;
    case 2: /* flags and avail_event words */
        wr16(h->sused, u16(in));
        wr16(h->sused + 4 + 8u * h->num, u16(in));
        break;
    default: /* scribble on the shadow descriptor table (the core must not read chain shapes back) */
        memset(h->sdesc + 16u * (u16(in) % h->num), u8(in), 16);
        break;
    }
}

/* ---- operations ------------------------------------------------------------------------------------------ */

static void op_drain(struct h *h, struct in *in)
{
    uint8_t m = u8(in);
    uint16_t dev_last = (m & 3) ? h->dev_avail : (uint16_t)(h->dev_avail + u8(in));
    bool honest = (m & 3) && h->exact && live(h);
    struct svq_vq_state vs;
    svq_get_vq_state(h->s, 0, &vs);
    uint16_t base = 0;
    int rc = svq_drain_vq(h->s, 0, dev_last, &base);
    used_seen(h); /* a drain takes the device's used entries first, whatever it decides after */
    if (rc != 0 && rc != -EIO && rc != -ERANGE && rc != -ENOTCONN && rc != -ENOMEM)
        TRAP("svq_drain_vq returned %d", rc);
    if (honest && rc != 0 && rc != -ENOMEM && !vq_broken(h))
        TRAP("drain with the device's true last_avail failed: %d", rc);
    if (rc != 0)
        return;
    uint8_t *gu = gptr(h, h->used_gpa, used_bytes(h->num));
    if (honest && gu && rd16(gu + 2) != base)
        TRAP("drained base %u but guest used idx is %u", base, rd16(gu + 2));
    uint16_t unconsumed = (uint16_t)(vs.shadow_avail - dev_last), inj_unconsumed = 0;
    for (uint16_t k = 0; honest && k < unconsumed; k++)
        inj_unconsumed += h->info[rd16(h->savail + 4 + 2u * ((uint16_t)(dev_last + k) & (h->num - 1)))].injected;
    if (honest && base != (uint16_t)(vs.guest_last_avail - (uint16_t)(unconsumed - inj_unconsumed)))
        TRAP("drained base %u does not rewind the unconsumed chains", base);
    h->guest_attached = h->shadow_attached = false;
    free_shadow(h);
    /* the guest picks up at the base, like QEMU after GET_VRING_BASE; the device starts anew anywhere */
    uint16_t sb = u16(in);
    if (m & 4)
        attach(h, base, sb);
}

static void op_regions(struct h *h, struct in *in)
{
    uint8_t m = u8(in);
    struct svq_region t[2] = {h->map[0], h->map[1]};
    uint32_t n = 2;
    if (m % 3 == 1) {
        n = 1; /* region B unplugged */
    } else if (m % 3 == 2) {
        t[0] = h->map[1];
        n = 1; /* region A unplugged */
    }
    int rc = svq_set_regions(h->s, t, n);
    if (rc != 0)
        TRAP("svq_set_regions returned %d", rc);
    memcpy(h->table, t, sizeof(t));
    h->ntable = n;
}

/* The guest scribbles on its own ring while the core thread processes it. */
static void op_race(struct h *h, struct in *in)
{
    uint8_t rounds = (uint8_t)(u8(in) % 16 + 1);
    h->exact = false;
    if (svq_start(h->s) != 0)
        TRAP("svq_start failed");
    for (uint8_t i = 0; i < rounds; i++) {
        uint8_t what = u8(in);
        if (what & 1) {
            uint8_t *a = gptr(h, h->avail_gpa, avail_bytes(h->num));
            if (a)
                wr16(a + 2, (uint16_t)(rd16(a + 2) + (what >> 1) % 4));
        } else {
            put_desc(h, h->desc_gpa + 16ull * (u16(in) % h->num), in);
        }
        uint64_t one = 1;
        if (write(efd_kick, &one, sizeof(one)) < 0) {
            /* a saturated eventfd still wakes the thread */
        }
    }
    if (svq_stop(h->s) != 0)
        TRAP("svq_stop failed");
    if (svq_running(h->s) != 0)
        TRAP("thread still running after svq_stop");
    /* the thread may have stopped before looking at the rings at all: a poll settles what it left */
    poll_once(h, true);
}

#ifdef SVQ_INJECT_SLOT
/* A proxy frame (the RARP after migration): it must sit inside the inject area and never reach the guest. */
static void op_inject(struct h *h, struct in *in)
{
    uint8_t m = u8(in);
    if (m & 1) {
        uint64_t size = (uint64_t)(m >> 1) % 4 * SVQ_INJECT_SLOT + (m & 0x80 ? 7 : 0);
        if (h->inj && size == h->inj_size)
            return;
        uint8_t *area = size ? calloc(1, size) : NULL;
        int rc = svq_set_inject_area(h->s, area, area ? INJ_IOVA : 0, area ? size : 0);
        if (verbose)
            fprintf(stderr, "svq_fuzz: inject area %llu bytes: %d\n", (unsigned long long)size, rc);
        if (rc != 0 && rc != -EBUSY && rc != -EINVAL)
            TRAP("svq_set_inject_area returned %d", rc);
        if (rc == 0) {
            free(h->inj);
            h->inj = area;
            h->inj_size = area ? size : 0;
        } else {
            free(area);
        }
        return;
    }
    uint8_t frame[SVQ_INJECT_SLOT + 1];
    size_t len = (m & 2) ? SVQ_INJECT_SLOT + (m & 4 ? 1 : 0) : 1 + u8(in);
    memset(frame, u8(in), len);
    int rc = svq_inject_tx(h->s, 0, frame, len);
    if (verbose)
        fprintf(stderr, "svq_fuzz: inject %zu bytes: %d\n", len, rc);
    if (rc != 0 && rc != -EINVAL && rc != -ENOTCONN && rc != -EIO && rc != -ENOBUFS && rc != -EAGAIN)
        TRAP("svq_inject_tx returned %d", rc);
    if (rc != 0)
        return;
    if (len > SVQ_INJECT_SLOT || !h->inj)
        TRAP("svq_inject_tx accepted %zu bytes with area %p", len, (void *)h->inj);
    uint16_t pub = rd16(h->savail + 2);
    if ((uint16_t)(pub - h->validated) != 1)
        TRAP("an injection published %u chains", (uint16_t)(pub - h->validated));
    uint16_t head = rd16(h->savail + 4 + 2u * (h->validated & (h->num - 1)));
    if (head >= h->num)
        TRAP("injected head %u not below %u", head, h->num);
    struct desc d;
    memcpy(&d, h->sdesc + 16u * head, sizeof(d));
    if (d.flags || d.len != len || d.addr < INJ_IOVA || d.addr - INJ_IOVA > h->inj_size - len ||
        memcmp(h->inj + (d.addr - INJ_IOVA), frame, len))
        TRAP("injected descriptor %#llx+%u flags %#x is not the frame in the inject area",
             (unsigned long long)d.addr, d.len, d.flags);
    h->info[head] = (struct shadow_info){.injected = true};
    h->validated = pub;
    h->inj_inflight++;
}
#endif

static void run_ops(struct h *h, struct in *in)
{
    for (int op = 0; op < MAX_OPS && in->n; op++) {
        uint8_t code = u8(in);
        if (verbose)
            fprintf(stderr, "svq_fuzz: op %u\n", code % 16);
        switch (code % 16) {
        case 0:
        case 1: /* descriptor */
            put_desc(h, h->desc_gpa + 16ull * (u16(in) % h->num), in);
            break;
        case 2:
        case 3: { /* offer a head */
            uint8_t *a = gptr(h, h->avail_gpa, avail_bytes(h->num));
            if (!a)
                break;
            uint16_t head = u16(in);
            if (!(head & 0x8000))
                head = (uint16_t)(head % (h->num + 1));
            uint64_t slot = h->avail_gpa + 4 + 2u * (h->g_avail & (h->num - 1));
            gwrite(h, slot, &head, 2);
            h->g_avail++;
            wr16(a + 2, h->g_avail);
            guest_wrote(h, h->avail_gpa + 2, 2);
            break;
        }
        case 4: { /* avail index anywhere */
            uint8_t *a = gptr(h, h->avail_gpa, avail_bytes(h->num));
            if (a) {
                h->g_avail = u16(in);
                wr16(a + 2, h->g_avail);
                guest_wrote(h, h->avail_gpa + 2, 2);
            }
            break;
        }
        case 5: { /* poke guest memory */
            uint64_t gpa = gen_addr(in);
            uint8_t n = (uint8_t)(u8(in) % 17), buf[16];
            for (uint8_t i = 0; i < n; i++)
                buf[i] = u8(in);
            gwrite(h, gpa, buf, n);
            break;
        }
        case 6: { /* an indirect table somewhere in guest memory */
            uint64_t gpa = GPA0 + 16ull * (u16(in) % (MEM / 16));
            uint8_t n = (uint8_t)(u8(in) % 8 + 1);
            for (uint8_t i = 0; i < n; i++)
                put_desc(h, gpa + 16ull * i, in);
            break;
        }
        case 7:
        case 8:
        case 9:
            poll_once(h, false);
            break;
        case 10:
        case 11:
            dev_complete(h, in);
            break;
        case 12:
            dev_hostile(h, in);
            break;
        case 13:
            op_drain(h, in);
            break;
        case 14: {
            uint8_t m = u8(in);
            if (m & 1) {
                int rc = svq_set_vq_log(h->s, 0, (m >> 1) & 1, m & 4 ? gen_addr(in) : h->used_gpa);
                if (rc != 0 && rc != -ENOTCONN && rc != -EINVAL)
                    TRAP("svq_set_vq_log returned %d", rc);
            } else {
                op_regions(h, in);
            }
            break;
        }
        default:
#ifdef SVQ_INJECT_SLOT
            if ((code & 0x30) == 0x30) {
                op_inject(h, in);
                break;
            }
#endif
            if (code & 0x10)
                op_race(h, in);
            else if (svq_detach(h->s, 0) == 0) {
                h->guest_attached = h->shadow_attached = false;
                free_shadow(h);
                attach(h, u16(in), u16(in));
            }
            break;
        }
        check_counters(h);
    }
}

static int lowest_free_fd(void)
{
    int fd = dup(0);
    if (fd >= 0)
        close(fd);
    return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct in in = {data, size};
    int fd_mark = lowest_free_fd();
    struct h *h = calloc(1, sizeof(*h));
    if (!h)
        return 0;
    uint8_t c1 = u8(&in), c2 = u8(&in), c3 = u8(&in);
    h->num = 1u << (c1 % 10);
    h->identity = !(c1 & 0x10);
    h->iova_adjacent = h->identity || (c1 & 0x20);
    h->gflags = (c1 & 0x40 ? SVQ_F_EVENT_IDX : 0) | (c1 & 0x80 ? SVQ_F_INDIRECT : 0) | (c2 & 4 ? SVQ_F_RX : 0) |
                (c2 & 8 ? SVQ_F_LOG : 0) | (c2 & 0x10 ? SVQ_F_MRG_RXBUF : 0);
    h->dflags = (c2 & 1 ? SVQ_DEV_INDIRECT : 0) | (c2 & 2 ? SVQ_DEV_EVENT_IDX : 0);
#ifdef SVQ_F_LEARN_MAC
    h->gflags |= (c2 & 0x20 ? SVQ_F_NET_HDR_12 : 0) | (c2 & 0x40 ? SVQ_F_LEARN_MAC : 0);
    h->dflags |= c2 & 0x80 ? SVQ_DEV_MRG_RXBUF : 0;
#endif
    h->call_fd = (c3 & 0x80) ? pipe_w : efd_call;
    for (int i = 0; i < 2; i++) {
        h->mem[i] = calloc(1, REG);
        if (!h->mem[i])
            abort();
        uint64_t gpa = GPA0 + (uint64_t)i * REG;
        uint64_t iova = h->identity ? gpa : gpa + SHIFT + (h->iova_adjacent || i == 0 ? 0 : GAP);
        h->map[i] = (struct svq_region){.gpa = gpa, .size = REG, .local = (uint64_t)(uintptr_t)h->mem[i],
                                        .iova = iova};
    }
    /* log: whole, one byte short, or tiny */
    uint64_t full = ((GPA0 + MEM) >> 12) / 8 + 1;
    h->log_size = (c3 & 3) == 1 ? full - 1 : (c3 & 3) == 2 ? 1 : full;
    h->log = calloc(1, h->log_size);
    h->s = svq_new(1, efd_err);
    if (!h->s || !h->log)
        abort();
    if (svq_set_regions(h->s, h->map, 2) != 0)
        TRAP("svq_set_regions rejected a valid table");
    memcpy(h->table, h->map, sizeof(h->map));
    h->ntable = 2;
    if (c3 & 4 && svq_set_log(h->s, h->log, h->log_size) != 0)
        TRAP("svq_set_log failed");
    /* ring placement: usually a proper layout inside region A or B, sometimes anywhere */
    size_t ring = 16u * h->num + avail_bytes(h->num) + 2 + used_bytes(h->num);
    uint16_t off = u16(&in);
    if (c3 & 0x40) {
        h->desc_gpa = gen_addr(&in) & ~15ull;
        h->avail_gpa = gen_addr(&in) & ~1ull;
        h->used_gpa = gen_addr(&in) & ~3ull;
    } else {
        uint64_t region = GPA0 + ((c3 & 8) ? REG : 0);
        uint64_t room = REG - ring;
        h->desc_gpa = region + ((off * 16ull) % (room + 1) & ~15ull);
        h->avail_gpa = h->desc_gpa + 16u * h->num;
        h->used_gpa = (h->avail_gpa + avail_bytes(h->num) + 3) & ~3ull;
    }
    h->log_used_gpa = (c3 & 0x20) ? gen_addr(&in) : h->used_gpa;
    attach(h, u16(&in), u16(&in));
    run_ops(h, &in);
    poll_once(h, false);
    if (verbose) {
        char reason[SVQ_REASON_LEN];
        svq_vq_error(h->s, 0, reason, sizeof(reason));
        fprintf(stderr, "svq_fuzz: num %u broken %d reason '%s'\n", h->num, vq_broken(h), reason);
    }
#ifdef SVQ_F_LEARN_MAC
    uint8_t mac[6];
    int have = svq_get_learned_mac(h->s, 0, mac);
    if (have != 0 && have != 1)
        TRAP("svq_get_learned_mac returned %d", have);
    if (have && ((mac[0] & 1) || !(mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5])))
        TRAP("learned a multicast or zero MAC");
#endif
    svq_free(h->s);
    for (int i = 0; i < 2; i++)
        free(h->mem[i]);
    free_shadow(h);
    free(h->inj);
    free(h->log);
    free(h);
    uint64_t v;
    while (read(efd_err, &v, sizeof(v)) > 0) {
    }
    int fd_now = lowest_free_fd();
    if (fd_now != fd_mark)
        TRAP("fd leak: lowest free fd went from %d to %d", fd_mark, fd_now);
    return 0;
}
