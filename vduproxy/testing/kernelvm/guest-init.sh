#!/bin/sh
# PID 1 of the kernel-tier guest (started as `init=/bin/sh -- <this file>`, so it needs no exec bit).
# The root file system is the host's / over virtio-9p, read-only; everything the kernel tier needs is built
# into the kernel, so there are no modules to load.
#
# The host shares a writable job directory with tag "vduproxyjob", mounted at /run/vduproxy-job:
#   in:  setup.env  shell assignments: VM_VDPA=1|0, VM_VDPA_MAC, VM_VDPA_MTU
#        job.sh     the command to run (cd, exports, exec), written by vduproxy.testing.kernelvm.vm
#   out: output     the command's stdout and stderr
#        rc         its exit status, written last (its presence means the command ran to completion)
#        setup-error  why the guest could not get to the command (then there is no rc)
#        out/       files the command writes ($VDUPROXY_VM_OUT)
# Lines on the console start with "VDUPROXY-VM:" so the host can tell init's messages from the kernel's.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
JOB=/run/vduproxy-job

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "VDUPROXY-VM: [$(up)] $*"; }
# With -no-reboot a reboot ends QEMU at once; sysrq does not depend on any userspace shutdown machinery.
off() { sync; echo b > /proc/sysrq-trigger; sleep 10; }
fail() { say "setup failed: $*"; [ -d "$JOB" ] && echo "$*" > "$JOB/setup-error"; off; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# /run and /tmp must be writable and the root is not: tmpfs over both (this hides the host's /tmp).
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p "$JOB"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vduproxyjob "$JOB" || fail "cannot mount the job share"
[ -r "$JOB/setup.env" ] || fail "no setup.env in the job share"
. "$JOB/setup.env"
if [ -n "${VM_KEEP_DIR:-}" ]; then
    # The job runs in a checkout under the host's /tmp (a CI clone, say): keep that one directory visible at
    # its own path, so every absolute path into it (the venv's python, an editable install) still works.
    mkdir -p /run/host-tmp && mount --bind /tmp /run/host-tmp || fail "cannot bind the host's /tmp"
fi
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "${VM_KEEP_DIR:-}" ]; then
    mkdir -p "$VM_KEEP_DIR" && mount --bind "/run/host-tmp/${VM_KEEP_DIR#/tmp/}" "$VM_KEEP_DIR" \
        || fail "cannot bind $VM_KEEP_DIR"
fi
say "kernel $(uname -r) up, mounts done"
mkdir -p "$JOB/out"

if [ "${VM_VDPA:-1}" = 1 ]; then
    # The management device of vdpa_sim_net is "vdpasim_net" (the iproute2 man page's vdpa_sim_net is wrong).
    msg=$(vdpa dev add name vdpa0 mgmtdev vdpasim_net mac "$VM_VDPA_MAC" mtu "$VM_VDPA_MTU" 2>&1) \
        || fail "vdpa dev add failed: $msg; mgmtdevs: $(vdpa mgmtdev show 2>&1 | tr '\n' ' ')"
    # devtmpfs creates the node asynchronously after vhost_vdpa binds: wait for it, but not forever.
    i=0
    while [ ! -c /dev/vhost-vdpa-0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -c /dev/vhost-vdpa-0 ] || fail "/dev/vhost-vdpa-0 did not appear; vdpa0 driver: \
$(readlink /sys/bus/vdpa/devices/vdpa0/driver 2>&1)"
    say "vdpa0 ($VM_VDPA_MAC, mtu $VM_VDPA_MTU) is /dev/vhost-vdpa-0"
fi

# vhost-vdpa pins every mapped page against RLIMIT_MEMLOCK, which is only 8 MiB for init.
ulimit -l unlimited || fail "cannot raise RLIMIT_MEMLOCK"

say "running the job"
sh "$JOB/job.sh" > "$JOB/output" 2>&1 < /dev/null
rc=$?
echo "$rc" > "$JOB/rc.tmp" && mv "$JOB/rc.tmp" "$JOB/rc"
say "job finished rc=$rc"
off
