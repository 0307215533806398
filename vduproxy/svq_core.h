/*
 * svq_core: the shadow virtqueue data path.
 *
 * One opaque handle serves every vq of one device (net: RX 2i, TX 2i+1). For each vq the handle knows the
 * guest's split ring (in guest memory, reached through a region table) and a shadow split ring (in proxy
 * memory, read by the vDPA device). A native thread moves avail chains guest -> shadow (translating GPAs to
 * IOVAs and flattening indirect tables when needed) and used entries shadow -> guest, logging every guest page
 * the device or the core wrote when dirty logging is on.
 *
 * Everything the guest or the device controls is checked; a violation puts only that vq in a broken state
 * (reason, fault counter, error eventfd signalled) and the other vqs keep running. Policy (when to switch, what
 * to do with a broken vq) lives in Python: vduproxy/svq.py is the only caller.
 *
 * Return values are 0 (or a count) on success, a negative errno on failure. Every function may be called from
 * any thread; configuration calls made while the thread runs pause it, apply, and resume it. The core dups
 * every fd it is given and closes its copies on detach/free; callers keep ownership of their own fds.
 *
 * Notifications: while the thread is busy it asks both sides not to notify it (with EVENT_IDX by leaving the
 * event indexes behind, without it by setting used->flags NO_NOTIFY toward the guest and avail->flags
 * NO_INTERRUPT toward the device); before sleeping it asks again and re-checks both rings after a full barrier.
 * Kicks toward the device and calls toward the guest are one eventfd write per batch, when the other side asks.
 * svq_poll ends the same way (both sides asked to notify). svq_set_busy_poll lets the thread keep polling up to
 * that many microseconds after the last entry moved before sleeping, with notifications still suppressed —
 * only while its sleeps keep ending sooner than that (two in a row): at low rates it sleeps at once.
 *
 * The part between the CDEF markers is parsed by vduproxy/_build_svq.py: plain declarations only there.
 */
#ifndef VDUPROXY_SVQ_CORE_H
#define VDUPROXY_SVQ_CORE_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define SVQ_ABI_VERSION 4

#define SVQ_MAX_VQS 512
#define SVQ_MAX_REGIONS 512
#define SVQ_MAX_RING 32768
#define SVQ_REASON_LEN 128
#define SVQ_INJECT_SLOT 2048 /* bytes of the inject area per injected frame (header + frame) */
#define SVQ_INJECT_SLOTS 64  /* most injected frames in flight at once, whatever the area's size */
#define SVQ_MAC_SAMPLE 64    /* once a MAC is learned, every this many TX chains is looked at again */

/* svq_attach_guest flags: what the guest negotiated for this vq */
#define SVQ_F_EVENT_IDX 1
#define SVQ_F_INDIRECT 2
#define SVQ_F_MRG_RXBUF 4
#define SVQ_F_RX 8  /* the device writes this queue's buffers */
#define SVQ_F_LOG 16 /* dirty-log this vq (needs svq_set_log) */
#define SVQ_F_NET_HDR_12 32 /* the guest's virtio_net_hdr is 12 bytes (VERSION_1 or MRG_RXBUF), else 10 */
#define SVQ_F_LEARN_MAC 64  /* a net TX queue: learn the source MAC of the guest's frames */

/* svq_attach_shadow dev_flags: what the device negotiated */
#define SVQ_DEV_EVENT_IDX 1
#define SVQ_DEV_INDIRECT 2
/* The device's MRG_RXBUF, when it may differ from the guest's: pass one of these two, or neither when they are
 * the same (then num_buffers passes through untouched). Guest with, device without: the core writes
 * num_buffers = 1 into every completed RX chain. Device with, guest without: a packet over several buffers
 * breaks the vq. */
#define SVQ_DEV_MRG_RXBUF 4
#define SVQ_DEV_NO_MRG_RXBUF 8

struct svq_region {
    uint64_t gpa;   /* guest physical address of the region */
    uint64_t size;
    uint64_t local; /* where this process mapped it */
    uint64_t iova;  /* where the device sees it */
};

struct svq_stats {
    uint64_t packets;     /* chains completed to the guest */
    uint64_t bytes;       /* sum of used lengths */
    uint64_t guest_kicks;
    uint64_t guest_calls;
    uint64_t dev_kicks;
    uint64_t dev_calls;
    uint64_t batches;     /* rounds that moved at least one avail or used entry */
    uint64_t faults;
    uint64_t dirty_pages; /* log bits this core turned from 0 to 1 */
    uint64_t clamped;     /* used lengths the device reported beyond the chain's writable size */
    uint64_t injected;    /* proxy frames (svq_inject_tx) the device completed */
    uint64_t mac_changes; /* times the learned source MAC was set or changed */
    uint32_t broken;
    uint32_t attached;
};

struct svq_thread_stats {
    uint64_t sleeps; /* epoll_waits that blocked (notifications armed) */
    uint64_t polls;  /* busy-poll periods started */
    uint64_t yields; /* idle rounds spent polling (a sched_yield each) */
};

struct svq_vq_state {
    uint16_t guest_last_avail; /* next guest avail entry the core will read */
    uint16_t guest_used;       /* next guest used index the core will write */
    uint16_t shadow_avail;     /* shadow avail->idx published to the device */
    uint16_t shadow_used;      /* next shadow used entry the core will read */
    uint32_t inflight;         /* chains forwarded to the device and not yet returned */
    uint32_t attached;         /* bit 0 guest ring, bit 1 shadow ring */
};

typedef struct svq svq_t;

int svq_abi_version(void);
svq_t *svq_new(uint32_t nvqs, int error_efd);
void svq_free(svq_t *s);

int svq_set_regions(svq_t *s, const struct svq_region *r, uint32_t n);
int svq_attach_guest(svq_t *s, uint32_t vq, uint32_t num, uint64_t desc_gpa, uint64_t avail_gpa,
                     uint64_t used_gpa, uint16_t last_avail, int kick_fd, int call_fd, uint32_t flags,
                     uint64_t log_used_gpa);
int svq_attach_shadow(svq_t *s, uint32_t vq, uint32_t num, void *desc, void *avail, void *used, uint16_t base,
                      int dev_kick_fd, int dev_call_fd, uint32_t dev_flags);
int svq_detach(svq_t *s, uint32_t vq);

int svq_start(svq_t *s);
int svq_stop(svq_t *s);
int svq_running(svq_t *s);
int svq_set_busy_poll(svq_t *s, uint32_t usec);
int svq_poll(svq_t *s);

int svq_set_log(svq_t *s, void *log_base, uint64_t log_size);
int svq_set_vq_log(svq_t *s, uint32_t vq, int on, uint64_t log_used_gpa);
/* A new guest call fd (SET_VRING_CALL on a running ring), dup'ed; -ENOTCONN without a guest ring. */
int svq_set_guest_call(svq_t *s, uint32_t vq, int call_fd);
int svq_drain_vq(svq_t *s, uint32_t vq, uint16_t dev_last_avail, uint16_t *guest_base);

/*
 * Proxy frames on a TX vq (a RARP after migration). The inject area is proxy memory the device can read
 * (`local` here, `iova` for the device), cut in SVQ_INJECT_SLOT-byte slots. svq_inject_tx copies `len` bytes
 * (the device's virtio-net header followed by the frame) into a free slot and offers it on the shadow ring; its
 * completion stays inside the core (counted in `injected`), never reaching the guest.
 * svq_inject_tx: 0, -EINVAL (bad vq/len or an RX vq), -ENOTCONN (rings not attached), -EIO (vq broken),
 * -ENOBUFS (no area or every slot in flight), -EAGAIN (shadow ring full right now).
 */
int svq_set_inject_area(svq_t *s, void *local, uint64_t iova, uint64_t size);
int svq_inject_tx(svq_t *s, uint32_t vq, const void *frame, size_t len);

/* The latest unicast source MAC seen on a SVQ_F_LEARN_MAC vq: 1 and 6 bytes in out, or 0 when none yet. */
int svq_get_learned_mac(svq_t *s, uint32_t vq, uint8_t *out);

int svq_get_stats(svq_t *s, uint32_t vq, struct svq_stats *out);
int svq_get_thread_stats(svq_t *s, struct svq_thread_stats *out);
int svq_get_vq_state(svq_t *s, uint32_t vq, struct svq_vq_state *out);
int svq_vq_error(svq_t *s, uint32_t vq, char *buf, size_t len);
/* CDEF-END */

#endif
