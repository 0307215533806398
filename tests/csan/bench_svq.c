/*
 * bench_svq: the SVQ core between a guest and a device played by this one process, for profiling the core
 * (callgrind instruction counts are stable on a noisy shared machine; wall-clock numbers are not).
 *
 * The guest posts `batch` chains per round on one vq (TX: one readable buffer holding a 12-byte virtio-net
 * header and the frame, as DPDK's virtio-user sends with VERSION_1; RX: one 2 KiB writable buffer); svq_poll
 * forwards them; the device reads (TX) or writes (RX) every byte and completes them; svq_poll returns them;
 * the guest reaps. Only svq_poll is the core's work: profile with
 *   valgrind --tool=callgrind --toggle-collect=svq_poll build/bench/bench_svq 64 32 20000
 * and divide the Ir of svq_poll (inclusive) by the packet count printed at the end.
 *
 * Usage: bench_svq SIZE BATCH PACKETS [rx] [log] [event_idx]   (flags as words, any order)
 */
#define _GNU_SOURCE
#include "svq_core.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define GPA 0x100000ull
#define NUM 256u
#define BUF 2048u
#define HDR 12u

struct ring {
    uint8_t *desc, *avail, *used;
};

static void ring_at(struct ring *r, uint8_t *base)
{
    r->desc = base;
    r->avail = base + 16u * NUM;
    r->used = r->avail + ((6 + 2u * NUM + 3) & ~3u);
}

static size_t ring_bytes(void) { return (16u * NUM + ((6 + 2u * NUM + 3) & ~3u) + 6 + 8u * NUM + 4095) & ~4095u; }

static uint16_t ld(const uint8_t *p) { return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE); }
static void st(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE); }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s SIZE BATCH PACKETS [rx] [log] [event_idx]\n", argv[0]);
        return 2;
    }
    uint32_t size = (uint32_t)strtoul(argv[1], NULL, 0), batch = (uint32_t)strtoul(argv[2], NULL, 0);
    uint64_t packets = strtoull(argv[3], NULL, 0);
    bool rx = false, logon = false, evidx = false;
    for (int i = 4; i < argc; i++) {
        rx |= strcmp(argv[i], "rx") == 0;
        logon |= strcmp(argv[i], "log") == 0;
        evidx |= strcmp(argv[i], "event_idx") == 0;
    }
    if (size + HDR > BUF || !batch || batch > NUM / 2) {
        fprintf(stderr, "size must fit %u bytes with its header, batch 1..%u\n", BUF, NUM / 2);
        return 2;
    }
    size_t rb = ring_bytes(), mem_size = rb + (size_t)NUM * BUF;
    uint8_t *mem = aligned_alloc(4096, mem_size), *shadow = aligned_alloc(4096, rb);
    uint8_t *frame = malloc(BUF);
    size_t log_size = (GPA + mem_size) / 4096 / 8 + 1;
    uint8_t *log = calloc(1, log_size);
    if (!mem || !shadow || !frame || !log)
        return 2;
    memset(mem, 0, mem_size);
    for (uint32_t i = 0; i < BUF; i++)
        frame[i] = (uint8_t)(i * 7);
    struct ring g, sh;
    ring_at(&g, mem);
    ring_at(&sh, shadow);
    int err = eventfd(0, EFD_NONBLOCK), kick = eventfd(0, EFD_NONBLOCK), call = eventfd(0, EFD_NONBLOCK);
    int dkick = eventfd(0, EFD_NONBLOCK), dcall = eventfd(0, EFD_NONBLOCK);
    svq_t *s = svq_new(2, err);
    struct svq_region reg = {.gpa = GPA, .size = mem_size, .local = (uint64_t)(uintptr_t)mem, .iova = GPA};
    uint32_t vq = rx ? 0 : 1;
    uint64_t d = GPA, a = d + 16u * NUM, u = a + ((6 + 2u * NUM + 3) & ~3u);
    uint32_t gflags = (rx ? SVQ_F_RX : 0) | (logon ? SVQ_F_LOG : 0) | (evidx ? SVQ_F_EVENT_IDX : 0);
    if (!s || svq_set_regions(s, &reg, 1) ||
        svq_attach_guest(s, vq, NUM, d, a, u, 0, kick, call, gflags, u) ||
        svq_attach_shadow(s, vq, NUM, sh.desc, sh.avail, sh.used, 0, dkick, dcall, evidx ? SVQ_DEV_EVENT_IDX : 0) ||
        (logon && svq_set_log(s, log, log_size))) {
        fprintf(stderr, "setup failed\n");
        return 1;
    }
    /* descriptor i always points at buffer i: the guest only rewrites avail entries, as a PMD does */
    for (uint32_t i = 0; i < NUM; i++) {
        uint64_t addr = GPA + rb + (uint64_t)i * BUF;
        uint32_t len = rx ? BUF : HDR + size;
        uint16_t flags = rx ? 2 : 0;
        memcpy(g.desc + 16u * i, &addr, 8);
        memcpy(g.desc + 16u * i + 8, &len, 4);
        memcpy(g.desc + 16u * i + 12, &flags, 2);
        if (!rx)
            memcpy(mem + rb + (size_t)i * BUF + HDR, frame, size);
    }
    uint16_t g_avail = 0, g_used = 0, d_avail = 0, d_used = 0;
    uint64_t done = 0, bytes = 0;
    double t0 = now_s();
    while (done < packets) {
        for (uint32_t k = 0; k < batch; k++) {
            memcpy(g.avail + 4 + 2u * (g_avail & (NUM - 1)), &(uint16_t){(uint16_t)(g_avail & (NUM - 1))}, 2);
            g_avail++;
        }
        st(g.avail + 2, g_avail);
        svq_poll(s);
        /* the device: every avail chain is one descriptor here */
        uint16_t end = ld(sh.avail + 2);
        while (d_avail != end) {
            uint16_t head = ld(sh.avail + 4 + 2u * (d_avail & (NUM - 1)));
            uint64_t addr;
            uint32_t len;
            memcpy(&addr, sh.desc + 16u * head, 8);
            memcpy(&len, sh.desc + 16u * head + 8, 4);
            uint8_t *p = mem + (addr - GPA);
            uint32_t used_len = 0;
            if (rx) {
                memcpy(p, frame, HDR + size);
                used_len = HDR + size;
            } else {
                memcpy(frame, p, len);
            }
            uint32_t elem[2] = {head, used_len};
            memcpy(sh.used + 4 + 8u * (d_used & (NUM - 1)), elem, 8);
            d_used++;
            d_avail++;
        }
        st(sh.used + 2, d_used);
        svq_poll(s);
        uint16_t gu = ld(g.used + 2);
        done += (uint16_t)(gu - g_used);
        bytes += (uint64_t)(uint16_t)(gu - g_used) * size;
        g_used = gu;
        if (gu != g_avail) {
            fprintf(stderr, "core stalled: guest avail %u used %u\n", g_avail, gu);
            return 1;
        }
    }
    double dt = now_s() - t0;
    struct svq_stats stt;
    svq_get_stats(s, vq, &stt);
    printf("packets %llu size %u batch %u %s%s%s: %.2f Mpps (wall clock, noisy), dev kicks %llu guest calls %llu "
           "dirty pages %llu broken %u\n",
           (unsigned long long)done, size, batch, rx ? "rx" : "tx", logon ? " log" : "", evidx ? " event_idx" : "",
           (double)done / dt / 1e6, (unsigned long long)stt.dev_kicks, (unsigned long long)stt.guest_calls,
           (unsigned long long)stt.dirty_pages, stt.broken);
    (void)bytes;
    svq_free(s);
    close(err);
    close(kick);
    close(call);
    close(dkick);
    close(dcall);
    free(mem);
    free(shadow);
    free(frame);
    free(log);
    return stt.broken ? 1 : 0;
}
