/*
 * sim_core: native data path of the software vDPA net device.
 *
 * One opaque handle per device. The handle owns a pthread that polls kick eventfds, an optional TAP fd and a
 * control eventfd, and runs the split virtqueues of a virtio-net device (RX 2i, TX 2i+1, CVQ 2N). Rings and
 * buffers are reached only through per-ASID IOTLBs whose entries point into this process's memory.
 *
 * Policy (status machine, feature negotiation, profile handling, argument checks that need no device state)
 * lives in Python (vduproxy/vdpa/sim.py). Every function here takes the device lock, so calls are safe while
 * the thread runs. Return values are 0 or a negative errno.
 */
#ifndef VDUPROXY_SIM_CORE_H
#define VDUPROXY_SIM_CORE_H

#include <stdint.h>

#define SIM_ABI_VERSION 3

#define SIM_MAX_VQS 65 /* 32 queue pairs + CVQ */
#define SIM_MAX_AS 4
#define SIM_MAX_GROUPS 2
#define SIM_CONFIG_SIZE 24 /* struct virtio_net_config up to supported_hash_types */
#define SIM_REASON_LEN 96
#define SIM_MAC_TABLE_MAX 64
#define SIM_TAP_NAME_LEN 16

#define SIM_BACKEND_LOOPBACK 0
#define SIM_BACKEND_TAP 1
#define SIM_BACKEND_SINK 2

#define SIM_PERM_RO 1
#define SIM_PERM_WO 2
#define SIM_PERM_RW 3

/* Fault injection (tests only; no vhost-vdpa counterpart): see sim_inject_fault */
#define SIM_INJECT_CLEAR 0      /* forget every fault injected into the vq */
#define SIM_INJECT_IOTLB_MISS 1 /* the next chain the vq takes misses the IOTLB: the vq faults (once) */
#define SIM_INJECT_STUCK 2      /* the vq is never processed again (no fault, no completion) until cleared */

struct sim_params {
    uint32_t pairs;          /* data queue pairs, 1..32 */
    uint32_t has_cvq;        /* CVQ at index 2*pairs */
    uint32_t cvq_group;      /* vring group of the CVQ (data vqs are group 0) */
    uint32_t ngroups;        /* 1..SIM_MAX_GROUPS */
    uint32_t nas;            /* address spaces, 1..SIM_MAX_AS */
    uint32_t ring_max;       /* power of two, <= 32768 */
    uint32_t backend;        /* SIM_BACKEND_* */
    uint32_t filter_mac_only; /* reset filter like vdpa_sim_net (unicast by MAC) instead of promiscuous */
    uint32_t busy_poll_us;   /* keep polling this long after the last progress before sleeping; 0 = off */
    uint32_t max_iotlb_entries; /* per address space */
    uint32_t rx_full_wait;   /* RX out of buffers: loopback TX / TAP frames wait for more (1) or are dropped (0) */
    char tap_name[SIM_TAP_NAME_LEN]; /* interface name for SIM_BACKEND_TAP */
    uint8_t config[SIM_CONFIG_SIZE]; /* initial struct virtio_net_config, little endian */
};

struct sim_vq_stats {
    uint64_t packets;
    uint64_t bytes;
    uint64_t kicks;
    uint64_t calls;
    uint64_t faults;
    uint64_t dropped;
    uint64_t waits; /* times frames were held for lack of RX room: TX vq (loopback, rx_full_wait), RX 0 (TAP) */
    uint32_t has_error;
    char error[SIM_REASON_LEN];
};

struct sim_fault {
    uint32_t vq;
    uint64_t iova;
    char reason[SIM_REASON_LEN];
};

struct sim_filter {
    uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast;
    uint8_t uc_overflow, mc_overflow;
    uint8_t mac[6];
    uint32_t uc_count, mc_count;
    uint8_t uc[SIM_MAC_TABLE_MAX][6];
    uint8_t mc[SIM_MAC_TABLE_MAX][6];
    uint32_t vlans[128]; /* bitmap of VLAN ids 0..4095 */
    uint32_t active_pairs;
    uint64_t guest_offloads;
    uint64_t cvq_commands; /* commands processed (acked OK or ERR) */
};

struct sim_dev;

int sim_abi_version(void);
int sim_create(const struct sim_params *params, struct sim_dev **out);
void sim_destroy(struct sim_dev *dev);
int sim_fault_fd(struct sim_dev *dev);

/* negotiation and status: `features` are the negotiated bits (set when FEATURES_OK is accepted) */
int sim_set_features(struct sim_dev *dev, uint64_t features);
int sim_set_driver_ok(struct sim_dev *dev);
int sim_reset(struct sim_dev *dev, int keep_iotlb);
int sim_suspend(struct sim_dev *dev);
int sim_resume(struct sim_dev *dev);
int sim_get_config(struct sim_dev *dev, uint32_t offset, uint8_t *out, uint32_t len);
int sim_set_config(struct sim_dev *dev, uint32_t offset, const uint8_t *data, uint32_t len);
int sim_set_group_asid(struct sim_dev *dev, uint32_t group, uint32_t asid);

/* vrings */
int sim_set_vring_num(struct sim_dev *dev, uint32_t index, uint32_t num);
int sim_set_vring_addr(struct sim_dev *dev, uint32_t index, uint64_t desc, uint64_t avail, uint64_t used);
int sim_set_vring_base(struct sim_dev *dev, uint32_t index, uint32_t base);
int sim_get_vring_base(struct sim_dev *dev, uint32_t index, uint32_t *base);
int sim_set_vring_kick(struct sim_dev *dev, uint32_t index, int fd);
int sim_set_vring_call(struct sim_dev *dev, uint32_t index, int fd);
/* `start_now`: the vq starts processing even though DRIVER_OK is already set (ENABLE_AFTER_DRIVER_OK) */
int sim_set_vring_enable(struct sim_dev *dev, uint32_t index, int enable, int start_now);

/* IOTLB */
int sim_iotlb_update(struct sim_dev *dev, uint32_t asid, uint64_t iova, uint64_t size, uint64_t uaddr,
                     uint32_t perm);
int sim_iotlb_invalidate(struct sim_dev *dev, uint32_t asid, uint64_t iova, uint64_t size);
int sim_iotlb_batch_begin(struct sim_dev *dev);
int sim_iotlb_batch_end(struct sim_dev *dev);
int sim_iotlb_count(struct sim_dev *dev, uint32_t asid, uint32_t *count);

/* observation */
int sim_vq_stats(struct sim_dev *dev, uint32_t index, struct sim_vq_stats *out);
/* 1 and *out filled when a fault was pending, 0 when none */
int sim_take_fault(struct sim_dev *dev, struct sim_fault *out);
int sim_filter_state(struct sim_dev *dev, struct sim_filter *out);
/* processing rounds the thread has run: each wake-up is one, so an idle device's count stands still */
int sim_rounds(struct sim_dev *dev, uint64_t *out);

/*
 * Fault injection for tests (SIM_INJECT_*). Injected faults survive a device reset, the way a broken piece of
 * hardware stays broken when its driver resets it; only SIM_INJECT_CLEAR takes them away. -ENOBUFS for a vq
 * out of range, -EINVAL for an unknown kind.
 */
int sim_inject_fault(struct sim_dev *dev, uint32_t index, uint32_t kind);

#endif
