/*
 * svq_core under AddressSanitizer + UndefinedBehaviorSanitizer: forwarding, drain, dirty log, the thread, and
 * the hostile-ring list, the learned MAC, frame injection, num_buffers bridging, against guest memory and shadow rings that are exact-size heap blocks (so any read or
 * write outside them is a sanitizer report). Built and run by tests/csan/run.sh; exit status 0 = all passed.
 */
#define _GNU_SOURCE
#include "svq_core.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define GPA 0x100000ull
#define MEM_SIZE (256u * 1024u)
#define SHIFT 0x7f0000000000ull
#define F_NEXT 1
#define F_WRITE 2
#define F_IND 4

static int failures;

#define CHECK(cond)                                                                                              \
    do {                                                                                                         \
        if (!(cond)) {                                                                                           \
            fprintf(stderr, "%s:%d: %s: CHECK failed: %s\n", __FILE__, __LINE__, __func__, #cond);               \
            failures++;                                                                                          \
        }                                                                                                        \
    } while (0)

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

/* One split ring inside some memory block: desc, avail, used at the offsets virtio 1.x allows. */
struct ring {
    uint8_t *base;
    uint32_t num;
    uint8_t *desc, *avail, *used;
};

static size_t ring_bytes(uint32_t num) { return 16u * num + 6 + 2u * num + 2 /* pad to 4 */ + 6 + 8u * num; }

static void ring_init(struct ring *r, uint8_t *base, uint32_t num)
{
    r->base = base;
    r->num = num;
    r->desc = base;
    r->avail = base + 16u * num;
    r->used = r->avail + ((6 + 2u * num + 3) & ~3u);
}

static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

struct env {
    uint8_t *mem; /* guest RAM: exactly MEM_SIZE bytes */
    uint64_t shift;
    size_t bump;
    svq_t *s;
    int err_efd;
    struct ring g[2], sh[2];
    uint8_t *shmem[2];
    uint16_t g_avail[2], dev_avail[2], dev_used[2], g_used_seen[2];
    int kick[2], call[2], dkick[2], dcall[2];
};

static uint64_t galloc(struct env *e, size_t size, size_t align)
{
    size_t off = (e->bump + align - 1) & ~(align - 1);
    if (off + size > MEM_SIZE) {
        fprintf(stderr, "test guest memory exhausted\n");
        exit(2);
    }
    e->bump = off + size;
    return GPA + off;
}

static uint8_t *gptr(struct env *e, uint64_t gpa) { return e->mem + (gpa - GPA); }

static int efd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

static uint64_t take(int fd)
{
    uint64_t v = 0;
    return read(fd, &v, 8) == 8 ? v : 0;
}

/* Guest RAM with two vqs: vq 0 at the very end of guest memory (ring overruns hit the redzone), vq 1 early. */
static void env_init(struct env *e, uint32_t num, uint64_t shift, uint32_t gflags, uint32_t dflags)
{
    memset(e, 0, sizeof(*e));
    e->mem = aligned_alloc(4096, MEM_SIZE);
    memset(e->mem, 0, MEM_SIZE);
    e->shift = shift;
    e->err_efd = efd();
    e->s = svq_new(2, e->err_efd);
    struct svq_region r = {
        .gpa = GPA, .size = MEM_SIZE, .local = (uint64_t)(uintptr_t)e->mem, .iova = GPA + shift};
    CHECK(svq_set_regions(e->s, &r, 1) == 0);
    size_t rb = (ring_bytes(num) + 15) & ~(size_t)15;
    uint64_t g0 = GPA + MEM_SIZE - rb;
    for (int v = 0; v < 2; v++) {
        uint64_t ggpa = v == 0 ? g0 : galloc(e, rb, 4096);
        ring_init(&e->g[v], gptr(e, ggpa), num);
        e->shmem[v] = aligned_alloc(16, rb);
        ring_init(&e->sh[v], e->shmem[v], num);
        e->kick[v] = efd();
        e->call[v] = efd();
        e->dkick[v] = efd();
        e->dcall[v] = efd();
        uint64_t d = ggpa, a = d + 16u * num, u = a + ((6 + 2u * num + 3) & ~3u);
        CHECK(svq_attach_guest(e->s, (uint32_t)v, num, d, a, u, 0, e->kick[v], e->call[v], gflags, u) == 0);
        CHECK(svq_attach_shadow(e->s, (uint32_t)v, num, e->sh[v].desc, e->sh[v].avail, e->sh[v].used, 0,
                                e->dkick[v], e->dcall[v], dflags) == 0);
    }
}

static void env_free(struct env *e)
{
    svq_free(e->s);
    for (int v = 0; v < 2; v++) {
        close(e->kick[v]);
        close(e->call[v]);
        close(e->dkick[v]);
        close(e->dcall[v]);
        free(e->shmem[v]);
    }
    close(e->err_efd);
    free(e->mem);
}

static void gdesc(struct env *e, int v, uint32_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    struct desc d = {addr, len, flags, next};
    memcpy(e->g[v].desc + 16u * i, &d, 16);
}

static void goffer(struct env *e, int v, uint16_t head)
{
    struct ring *r = &e->g[v];
    wr16(r->avail + 4 + 2u * (e->g_avail[v] & (r->num - 1)), head);
    e->g_avail[v]++;
    __atomic_store_n((uint16_t *)(void *)(r->avail + 2), e->g_avail[v], __ATOMIC_RELEASE);
}

/* Device side: pop one shadow avail chain; returns its head or -1. */
static int dpop(struct env *e, int v)
{
    struct ring *r = &e->sh[v];
    if (rd16(r->avail + 2) == e->dev_avail[v])
        return -1;
    uint16_t head = rd16(r->avail + 4 + 2u * (e->dev_avail[v] & (r->num - 1)));
    e->dev_avail[v]++;
    return head;
}

/* Device side: gather readable bytes (or scatter `data` into writable ones) of a shadow chain. */
static size_t dcopy(struct env *e, int v, int head, uint8_t *data, size_t cap, bool write_it)
{
    struct ring *r = &e->sh[v];
    size_t done = 0;
    uint32_t idx = (uint32_t)head;
    for (uint32_t hops = 0; hops < r->num; hops++) {
        struct desc d;
        memcpy(&d, r->desc + 16u * idx, 16);
        struct desc one[1] = {d};
        const struct desc *list = one;
        uint32_t n = 1;
        struct desc tab[64];
        if (d.flags & F_IND) {
            n = d.len / 16 < 64 ? d.len / 16 : 64;
            memcpy(tab, gptr(e, d.addr - e->shift), 16u * n);
            list = tab;
        }
        for (uint32_t k = 0, i = 0; k < n; k++) {
            const struct desc *b = &list[i];
            bool w = b->flags & F_WRITE;
            if (w == write_it && done < cap) {
                size_t c = b->len < cap - done ? b->len : cap - done;
                uint8_t *p = gptr(e, b->addr - e->shift);
                if (write_it)
                    memcpy(p, data + done, c);
                else
                    memcpy(data + done, p, c);
                done += c;
            }
            if (!(d.flags & F_IND) || !(b->flags & F_NEXT))
                break;
            i = b->next;
        }
        if (!(d.flags & F_NEXT))
            break;
        idx = d.next;
    }
    return done;
}

static void dcomplete(struct env *e, int v, int head, uint32_t len)
{
    struct ring *r = &e->sh[v];
    uint32_t elem[2] = {(uint32_t)head, len};
    memcpy(r->used + 4 + 8u * (e->dev_used[v] & (r->num - 1)), elem, 8);
    e->dev_used[v]++;
    __atomic_store_n((uint16_t *)(void *)(r->used + 2), e->dev_used[v], __ATOMIC_RELEASE);
}

static uint16_t gused_idx(struct env *e, int v) { return rd16(e->g[v].used + 2); }

static void gused_elem(struct env *e, int v, uint16_t i, uint32_t *id, uint32_t *len)
{
    uint32_t elem[2];
    memcpy(elem, e->g[v].used + 4 + 8u * (i & (e->g[v].num - 1)), 8);
    *id = elem[0];
    *len = elem[1];
}

static bool broken(struct env *e, int v)
{
    struct svq_stats st;
    return svq_get_stats(e->s, (uint32_t)v, &st) == 0 && st.broken;
}

/* vq 1 must keep working whatever happened to vq 0 */
static void check_vq1_forwards(struct env *e)
{
    uint64_t b = galloc(e, 32, 16);
    memset(gptr(e, b), 0x5a, 32);
    uint16_t head = (uint16_t)(e->g_avail[1] & (e->g[1].num - 1));
    gdesc(e, 1, head, b, 32, 0, 0);
    goffer(e, 1, head);
    CHECK(svq_poll(e->s) >= 1);
    int h = dpop(e, 1);
    CHECK(h >= 0);
    if (h < 0)
        return;
    uint8_t got[32] = {0};
    CHECK(dcopy(e, 1, h, got, sizeof(got), false) == 32 && got[0] == 0x5a && got[31] == 0x5a);
    uint16_t before = gused_idx(e, 1);
    dcomplete(e, 1, h, 0);
    svq_poll(e->s);
    CHECK(gused_idx(e, 1) == (uint16_t)(before + 1));
    CHECK(!broken(e, 1));
}

/* ---- forwarding ------------------------------------------------------------------------------------------ */

static void test_tx_rx_log(uint64_t shift, uint32_t dflags)
{
    struct env e;
    env_init(&e, 8, shift, SVQ_F_RX | SVQ_F_LOG | SVQ_F_EVENT_IDX | SVQ_F_INDIRECT, dflags);
    size_t log_size = (GPA + MEM_SIZE) / 4096 / 8;
    uint8_t *log = calloc(1, log_size);
    CHECK(svq_set_log(e.s, log, log_size) == 0);
    /* TX on vq 1: a two-buffer chain */
    uint64_t h = galloc(&e, 12, 16), p = galloc(&e, 100, 16);
    memset(gptr(&e, h), 1, 12);
    memset(gptr(&e, p), 2, 100);
    gdesc(&e, 1, 0, h, 12, F_NEXT, 1);
    gdesc(&e, 1, 1, p, 100, 0, 0);
    goffer(&e, 1, 0);
    /* RX on vq 0: an indirect table of two writable buffers crossing a page */
    uint64_t b1 = galloc(&e, 5000, 4096), b2 = galloc(&e, 300, 16), t = galloc(&e, 32, 16);
    struct desc tab[2] = {{b1 + 100, 5000 - 100, F_WRITE | F_NEXT, 1}, {b2, 300, F_WRITE, 0}};
    memcpy(gptr(&e, t), tab, sizeof(tab));
    gdesc(&e, 0, 0, t, 32, F_IND, 0);
    goffer(&e, 0, 0);
    CHECK(svq_poll(e.s) == 2);
    int th = dpop(&e, 1), rh = dpop(&e, 0);
    CHECK(th >= 0 && rh >= 0);
    uint8_t buf[5200];
    CHECK(dcopy(&e, 1, th, buf, sizeof(buf), false) == 112 && buf[0] == 1 && buf[111] == 2);
    memset(buf, 7, sizeof(buf));
    CHECK(dcopy(&e, 0, rh, buf, 5000, true) == 5000);
    dcomplete(&e, 1, th, 0);
    dcomplete(&e, 0, rh, 5000);
    CHECK(svq_poll(e.s) == 2);
    uint32_t id, len;
    gused_elem(&e, 0, 0, &id, &len);
    CHECK(gused_idx(&e, 0) == 1 && id == 0 && len == 5000);
    CHECK(gptr(&e, b2)[99] == 7 && gptr(&e, b2)[100] == 0);
    /* every page of b1 written plus b2's page are marked */
    for (uint64_t g = b1 + 100; g < b1 + 5000; g += 512)
        CHECK(log[(g >> 12) >> 3] & (1u << ((g >> 12) & 7)));
    CHECK(log[(b2 >> 12) >> 3] & (1u << ((b2 >> 12) & 7)));
    struct svq_stats st;
    svq_get_stats(e.s, 0, &st);
    CHECK(st.packets == 1 && st.bytes == 5000 && st.dirty_pages >= 2 && !st.broken);
    /* drain vq 1 with nothing in flight */
    uint16_t base = 0;
    CHECK(svq_drain_vq(e.s, 1, e.dev_avail[1], &base) == 0 && base == 1);
    env_free(&e);
    free(log);
}

static void test_wrap_and_drain(void)
{
    struct env e;
    env_init(&e, 8, SHIFT, 0, 0);
    /* restart both sides near the 16-bit wrap */
    uint16_t gb = 0xfffd, sb = 0xfffe;
    struct ring *g = &e.g[0];
    wr16(g->avail + 2, gb);
    wr16(g->used + 2, gb);
    e.g_avail[0] = gb;
    e.dev_avail[0] = e.dev_used[0] = sb;
    uint64_t d = (uint64_t)(g->desc - e.mem) + GPA, a = d + 16u * 8, u = a + ((6 + 2u * 8 + 3) & ~3u);
    CHECK(svq_detach(e.s, 0) == 0);
    CHECK(svq_attach_guest(e.s, 0, 8, d, a, u, gb, -1, e.call[0], 0, 0) == 0);
    CHECK(svq_attach_shadow(e.s, 0, 8, e.sh[0].desc, e.sh[0].avail, e.sh[0].used, sb, -1, -1, 0) == 0);
    for (uint16_t i = 0; i < 6; i++) {
        uint64_t b = galloc(&e, 64, 16);
        gdesc(&e, 0, i, b, 64, F_WRITE, 0);
        goffer(&e, 0, i);
    }
    CHECK(svq_poll(e.s) == 6);
    int hs[4];
    for (int i = 0; i < 4; i++)
        hs[i] = dpop(&e, 0);
    dcomplete(&e, 0, hs[1], 10);
    uint16_t base = 0;
    /* a device claiming to have consumed beyond what was offered is refused, and nothing changes */
    CHECK(svq_drain_vq(e.s, 0, (uint16_t)(e.dev_avail[0] + 3), &base) == -ERANGE);
    CHECK(svq_drain_vq(e.s, 0, e.dev_avail[0], &base) == 0);
    CHECK(base == (uint16_t)(gb + 4));
    CHECK(gused_idx(&e, 0) == base);
    uint32_t id, len;
    gused_elem(&e, 0, gb, &id, &len);
    CHECK(id == 1 && len == 10);
    gused_elem(&e, 0, (uint16_t)(gb + 1), &id, &len);
    CHECK(id == 0 && len == 0);
    struct svq_vq_state vs;
    svq_get_vq_state(e.s, 0, &vs);
    CHECK(vs.attached == 0);
    check_vq1_forwards(&e);
    env_free(&e);
}

static void test_thread(void)
{
    struct env e;
    env_init(&e, 16, SHIFT, SVQ_F_EVENT_IDX, SVQ_DEV_EVENT_IDX);
    CHECK(svq_set_busy_poll(e.s, 50) == 0);
    CHECK(svq_start(e.s) == 0);
    uint32_t completed = 0;
    for (int round = 0; round < 200; round++) {
        uint64_t b = galloc(&e, 16, 16);
        uint16_t head = (uint16_t)(round & 15);
        /* EVENT_IDX on both sides: ask for a call at the next used entry and a kick at the next avail one */
        wr16(e.g[1].avail + 4 + 2u * 16, (uint16_t)round);
        wr16(e.sh[1].used + 4 + 8u * 16, e.dev_avail[1]);
        gdesc(&e, 1, head, b, 16, 0, 0);
        goffer(&e, 1, head);
        uint64_t one = 1;
        CHECK(write(e.kick[1], &one, 8) == 8);
        int h;
        while ((h = dpop(&e, 1)) < 0) {
            struct pollfd p = {.fd = e.dkick[1], .events = POLLIN};
            poll(&p, 1, 1000);
            take(e.dkick[1]);
        }
        dcomplete(&e, 1, h, 0);
        CHECK(write(e.dcall[1], &one, 8) == 8);
        while (gused_idx(&e, 1) != (uint16_t)(round + 1)) {
            struct pollfd p = {.fd = e.call[1], .events = POLLIN};
            poll(&p, 1, 1000);
            take(e.call[1]);
        }
        completed++;
        if (round == 100) { /* reconfigure under traffic: pauses and resumes the thread */
            CHECK(svq_set_busy_poll(e.s, 0) == 0);
            CHECK(svq_running(e.s) == 1);
        }
    }
    CHECK(completed == 200);
    CHECK(svq_stop(e.s) == 0);
    struct svq_stats st;
    svq_get_stats(e.s, 1, &st);
    CHECK(st.packets == 200 && !st.broken);
    env_free(&e);
}

/* ---- hostile rings --------------------------------------------------------------------------------------- */

typedef void (*hostile_fn)(struct env *e);

static void h_head(struct env *e) { goffer(e, 0, 9); }
static void h_next(struct env *e) { gdesc(e, 0, 0, galloc(e, 64, 16), 64, F_NEXT, 8); goffer(e, 0, 0); }
static void h_loop(struct env *e)
{
    uint64_t b = galloc(e, 64, 16);
    gdesc(e, 0, 0, b, 64, F_NEXT, 1);
    gdesc(e, 0, 1, b, 64, F_NEXT, 2);
    gdesc(e, 0, 2, b, 64, F_NEXT, 0);
    goffer(e, 0, 0);
}
static void h_wrap(struct env *e) { gdesc(e, 0, 0, UINT64_MAX - 10, 100, 0, 0); goffer(e, 0, 0); }
static void h_outside(struct env *e) { gdesc(e, 0, 0, GPA - 64, 64, 0, 0); goffer(e, 0, 0); }
static void h_cross(struct env *e) { gdesc(e, 0, 0, GPA + MEM_SIZE - 8, 64, F_WRITE, 0); goffer(e, 0, 0); }
static void h_jump(struct env *e) { wr16(e->g[0].avail + 2, 9); }
static void h_nested(struct env *e)
{
    uint64_t t = galloc(e, 32, 16);
    struct desc tab[2] = {{galloc(e, 64, 16), 64, F_NEXT, 1}, {t, 16, F_IND, 0}};
    memcpy(gptr(e, t), tab, sizeof(tab));
    gdesc(e, 0, 0, t, 32, F_IND, 0);
    goffer(e, 0, 0);
}
static void h_ind_len(struct env *e) { gdesc(e, 0, 0, galloc(e, 64, 16), 40, F_IND, 0); goffer(e, 0, 0); }
static void h_ind_long(struct env *e) { gdesc(e, 0, 0, GPA, 16u * 40000u, F_IND, 0); goffer(e, 0, 0); }
static void h_ind_end(struct env *e)
{
    /* a table whose first entry is valid and chains on past the end of guest memory */
    struct desc d = {galloc(e, 64, 16), 64, F_NEXT, 1};
    memcpy(gptr(e, GPA + MEM_SIZE - 16), &d, sizeof(d));
    gdesc(e, 0, 0, GPA + MEM_SIZE - 16, 64, F_IND, 0);
    goffer(e, 0, 0);
}
static void h_ind_next(struct env *e)
{
    uint64_t t = galloc(e, 16, 16);
    struct desc d = {galloc(e, 64, 16), 64, F_NEXT, 1};
    memcpy(gptr(e, t), &d, sizeof(d));
    gdesc(e, 0, 0, t, 16, F_IND, 0);
    goffer(e, 0, 0);
}
static void h_dev_id(struct env *e)
{
    gdesc(e, 0, 0, galloc(e, 64, 16), 64, 0, 0);
    goffer(e, 0, 0);
    svq_poll(e->s);
    dpop(e, 0);
    dcomplete(e, 0, 5, 0);
}
static void h_dev_jump(struct env *e)
{
    gdesc(e, 0, 0, galloc(e, 64, 16), 64, 0, 0);
    goffer(e, 0, 0);
    svq_poll(e->s);
    wr16(e->sh[0].used + 2, 40);
}

static void run_hostile(const char *name, const char *words, hostile_fn fn, uint32_t dflags, uint64_t shift)
{
    struct env e;
    env_init(&e, 8, shift, SVQ_F_INDIRECT | SVQ_F_RX, dflags);
    fn(&e);
    svq_poll(e.s);
    struct svq_stats st;
    svq_get_stats(e.s, 0, &st);
    char reason[SVQ_REASON_LEN];
    svq_vq_error(e.s, 0, reason, sizeof(reason));
    if (!st.broken || st.faults != 1 || !strstr(reason, words) || take(e.err_efd) != 1) {
        fprintf(stderr, "hostile %s (dev flags %u): broken=%u faults=%llu reason='%s'\n", name, dflags, st.broken,
                (unsigned long long)st.faults, reason);
        failures++;
    }
    CHECK(gused_idx(&e, 0) == 0);
    svq_poll(e.s);
    svq_get_stats(e.s, 0, &st);
    CHECK(st.faults == 1);
    check_vq1_forwards(&e);
    env_free(&e);
}

static void test_pipe_call_fd(void)
{
    int p[2];
    CHECK(pipe(p) == 0);
    close(p[0]);
    struct env e;
    env_init(&e, 8, SHIFT, 0, 0);
    struct ring *g = &e.g[0];
    uint64_t d = (uint64_t)(g->desc - e.mem) + GPA, a = d + 128, u = a + ((6 + 16 + 3) & ~3u);
    CHECK(svq_detach(e.s, 0) == 0);
    CHECK(svq_attach_guest(e.s, 0, 8, d, a, u, 0, -1, p[1], 0, 0) == 0);
    CHECK(svq_attach_shadow(e.s, 0, 8, e.sh[0].desc, e.sh[0].avail, e.sh[0].used, 0, -1, -1, 0) == 0);
    gdesc(&e, 0, 0, galloc(&e, 64, 16), 64, 0, 0);
    goffer(&e, 0, 0);
    svq_poll(e.s);
    dcomplete(&e, 0, dpop(&e, 0), 0);
    svq_poll(e.s);
    char reason[SVQ_REASON_LEN];
    svq_vq_error(e.s, 0, reason, sizeof(reason));
    CHECK(broken(&e, 0) && strstr(reason, "call fd"));
    check_vq1_forwards(&e);
    close(p[1]);
    env_free(&e);
}

/* Random garbage in the descriptor table and avail ring: never a sanitizer report, never a wild IOVA. */
static void test_fuzz(void)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int iter = 0; iter < 3000; iter++) {
        struct env e;
        env_init(&e, 8, iter & 1 ? 0 : SHIFT, SVQ_F_INDIRECT | (iter & 2 ? SVQ_F_EVENT_IDX : 0),
                 iter & 4 ? SVQ_DEV_INDIRECT : 0);
        for (uint32_t i = 0; i < 8; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            uint64_t addr = (x & 1) ? x : GPA + (x >> 8) % (MEM_SIZE + 64);
            uint32_t len = (x & 2) ? (uint32_t)(x >> 32) : (uint32_t)((x >> 20) % 600);
            gdesc(&e, 0, i, addr, len, (uint16_t)((x >> 40) & 7), (uint16_t)((x >> 44) % 10));
            /* sometimes a table right here in guest memory, with garbage inside */
            if ((x >> 50) % 4 == 0) {
                uint64_t t = galloc(&e, 64, 16);
                for (int k = 0; k < 64; k++)
                    gptr(&e, t)[k] = (uint8_t)(x >> (k % 56));
                struct desc td = {GPA + (x >> 10) % 4096, (uint32_t)((x >> 30) % 200),
                                  (uint16_t)((x >> 3) & 3), 1};
                memcpy(gptr(&e, t), &td, 16);
                gdesc(&e, 0, i, t, 16u * (uint32_t)(1 + (x >> 56) % 4), F_IND, 0);
            }
        }
        for (int k = 0; k < 6; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            goffer(&e, 0, (uint16_t)(x % 10));
        }
        svq_poll(e.s);
        int h;
        while ((h = dpop(&e, 0)) >= 0) {
            uint8_t scratch[4096];
            if (h >= 8) {
                CHECK(h < 8);
                break;
            }
            dcopy(&e, 0, h, scratch, sizeof(scratch), false);
            dcopy(&e, 0, h, scratch, sizeof(scratch), true);
            dcomplete(&e, 0, h, (uint32_t)(x >> 33));
        }
        svq_poll(e.s);
        uint16_t base;
        if (!broken(&e, 0))
            CHECK(svq_drain_vq(e.s, 0, e.dev_avail[0], &base) == 0);
        env_free(&e);
    }
}

/* ---- migration features ---------------------------------------------------------------------------------- */

/* Learned MAC through a header split from the frame, RARP injection on TX, num_buffers bridging on RX. */
static void test_mac_inject_num_buffers(void)
{
    struct env e;
    env_init(&e, 8, SHIFT, SVQ_F_RX | SVQ_F_MRG_RXBUF | SVQ_F_NET_HDR_12, SVQ_DEV_NO_MRG_RXBUF);
    { /* vq 1 becomes a TX queue that learns */
        struct ring *g = &e.g[1];
        uint64_t d = (uint64_t)(g->desc - e.mem) + GPA, a = d + 128, u = a + ((6 + 16 + 3) & ~3u);
        CHECK(svq_attach_guest(e.s, 1, 8, d, a, u, 0, e.kick[1], e.call[1], SVQ_F_NET_HDR_12 | SVQ_F_LEARN_MAC,
                               0) == 0);
    }
    /* vq 1 (TX): header in one descriptor, frame (dst, src) in the next */
    static const uint8_t mac[6] = {0x52, 0x54, 0, 0x12, 0x34, 0x56};
    uint64_t h = galloc(&e, 12, 16), f = galloc(&e, 60, 16);
    memset(gptr(&e, h), 0, 12);
    memset(gptr(&e, f), 0xff, 6);
    memcpy(gptr(&e, f) + 6, mac, 6);
    gdesc(&e, 1, 0, h, 12, F_NEXT, 1);
    gdesc(&e, 1, 1, f, 60, 0, 0);
    goffer(&e, 1, 0);
    uint8_t got[6] = {0};
    CHECK(svq_get_learned_mac(e.s, 1, got) == 0);
    CHECK(svq_inject_tx(e.s, 1, "x", 1) == -ENOBUFS);
    uint8_t *area = aligned_alloc(4096, 2 * SVQ_INJECT_SLOT);
    CHECK(svq_set_inject_area(e.s, area, 0x7e0000000000ull, 2 * SVQ_INJECT_SLOT) == 0);
    CHECK(svq_poll(e.s) == 1);
    uint8_t rarp[12 + 60];
    memset(rarp, 0xab, sizeof(rarp));
    CHECK(svq_inject_tx(e.s, 1, rarp, sizeof(rarp)) == 0);
    CHECK(svq_inject_tx(e.s, 1, rarp, SVQ_INJECT_SLOT + 1) == -EINVAL);
    CHECK(svq_inject_tx(e.s, 0, rarp, sizeof(rarp)) == -EINVAL);
    CHECK(svq_get_learned_mac(e.s, 1, got) == 1 && memcmp(got, mac, 6) == 0);
    int t1 = dpop(&e, 1), t2 = dpop(&e, 1);
    CHECK(t1 >= 0 && t2 >= 0);
    if (t1 < 0 || t2 < 0) {
        env_free(&e);
        free(area);
        return;
    }
    struct desc d;
    memcpy(&d, e.sh[1].desc + 16u * (uint32_t)t2, 16);
    CHECK(d.addr >= 0x7e0000000000ull && d.len == sizeof(rarp) && !(d.flags & (F_NEXT | F_WRITE)));
    CHECK(memcmp(area + (d.addr - 0x7e0000000000ull), rarp, sizeof(rarp)) == 0);
    dcomplete(&e, 1, t2, 0);
    dcomplete(&e, 1, t1, 0);
    svq_poll(e.s);
    CHECK(gused_idx(&e, 1) == 1);
    struct svq_stats st;
    svq_get_stats(e.s, 1, &st);
    CHECK(st.packets == 1 && st.injected == 1 && st.mac_changes == 1 && !st.broken);
    /* vq 0 (RX): the header split after 8 bytes; a device without MRG_RXBUF left num_buffers 0 */
    uint64_t b1 = galloc(&e, 8, 16), b2 = galloc(&e, 256, 16);
    gdesc(&e, 0, 0, b1, 8, F_WRITE | F_NEXT, 1);
    gdesc(&e, 0, 1, b2, 256, F_WRITE, 0);
    goffer(&e, 0, 0);
    svq_poll(e.s);
    int r = dpop(&e, 0);
    uint8_t pkt[100] = {0};
    pkt[20] = 0x77;
    CHECK(r >= 0 && dcopy(&e, 0, r, pkt, sizeof(pkt), true) == sizeof(pkt));
    dcomplete(&e, 0, r, sizeof(pkt));
    svq_poll(e.s);
    CHECK(gused_idx(&e, 0) == 1 && gptr(&e, b2)[2] == 1 && gptr(&e, b2)[3] == 0 && gptr(&e, b2)[12] == 0x77);
    CHECK(svq_set_inject_area(e.s, NULL, 0, 0) == 0);
    env_free(&e);
    free(area);
}

/* A guest that rewrites an in-flight indirect RX table to point outside its memory breaks only that vq when
 * the core goes to write num_buffers through it. */
static void test_num_buffers_hostile_table(void)
{
    struct env e;
    env_init(&e, 8, 0, SVQ_F_RX | SVQ_F_MRG_RXBUF | SVQ_F_INDIRECT, SVQ_DEV_INDIRECT | SVQ_DEV_NO_MRG_RXBUF);
    uint64_t t = galloc(&e, 16, 16), b = galloc(&e, 128, 16);
    struct desc one = {b, 128, F_WRITE, 0};
    memcpy(gptr(&e, t), &one, 16);
    gdesc(&e, 0, 0, t, 16, F_IND, 0);
    goffer(&e, 0, 0);
    svq_poll(e.s);
    int r = dpop(&e, 0);
    CHECK(r >= 0);
    struct desc evil = {GPA + MEM_SIZE - 4, 128, F_WRITE, 0};
    memcpy(gptr(&e, t), &evil, 16);
    dcomplete(&e, 0, r, 64);
    svq_poll(e.s);
    char reason[SVQ_REASON_LEN];
    svq_vq_error(e.s, 0, reason, sizeof(reason));
    CHECK(broken(&e, 0) && strstr(reason, "unreachable") && gused_idx(&e, 0) == 0);
    check_vq1_forwards(&e);
    env_free(&e);
}

/* After a poll both sides may notify again; while the thread was busy it had asked them not to. */
static void test_notify_flags(void)
{
    struct env e;
    env_init(&e, 8, SHIFT, 0, 0);
    wr16(e.g[0].used, 1); /* left by a passthrough device */
    gdesc(&e, 0, 0, galloc(&e, 64, 16), 64, 0, 0);
    goffer(&e, 0, 0);
    CHECK(svq_poll(e.s) == 1);
    CHECK(rd16(e.g[0].used) == 0 && rd16(e.sh[0].avail) == 0);
    env_free(&e);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as the daemon does */
    test_tx_rx_log(SHIFT, 0);
    test_tx_rx_log(0, SVQ_DEV_INDIRECT);
    test_wrap_and_drain();
    test_thread();
    const struct {
        const char *name, *words;
        hostile_fn fn;
    } cases[] = {
        {"head >= num", "head 9 is not below", h_head},
        {"next >= num", "next 8 is not below", h_next},
        {"loop", "loops", h_loop},
        {"addr+len wraps", "wraps", h_wrap},
        {"outside regions", "outside guest memory", h_outside},
        {"crosses region end", "outside guest memory", h_cross},
        {"avail idx jump", "entries ahead", h_jump},
        {"indirect in indirect", "inside an indirect", h_nested},
        {"indirect len", "multiple of 16", h_ind_len},
        {"indirect too long", "longer than", h_ind_long},
        {"indirect past end", "outside guest memory", h_ind_end},
        {"indirect next beyond", "beyond a table", h_ind_next},
        {"device used id", "not a chain in flight", h_dev_id},
        {"device used idx jump", "chains in flight", h_dev_jump},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        run_hostile(cases[i].name, cases[i].words, cases[i].fn, 0, SHIFT);
        run_hostile(cases[i].name, cases[i].words, cases[i].fn, SVQ_DEV_INDIRECT, 0);
    }
    test_pipe_call_fd();
    test_mac_inject_num_buffers();
    test_num_buffers_hostile_table();
    test_notify_flags();
    test_fuzz();
    if (failures) {
        fprintf(stderr, "svq_test: %d check(s) failed\n", failures);
        return 1;
    }
    printf("svq_test: all checks passed\n");
    return 0;
}
