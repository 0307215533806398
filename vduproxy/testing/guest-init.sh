#!/bin/sh
# /init of the vduproxy test-bed guest (busybox-static, virtio_net modules in /lib/modules/load-order).
#
# Kernel command-line keys (all optional):
#   lab.ip=CIDR        eth0 address                      (10.0.2.15/24)
#   lab.peer=IP        peer used by lab.ping / lab.loop  (10.0.2.2)
#   lab.peermac=MAC    static ARP entry for the peer, or "none" when the peer answers ARP
#                      (a testpmd 5tswap echo never answers ARP)     (02:00:00:00:00:02)
#   lab.ping=N         ping the peer N times after bring-up; prints VDUP-PING-RESULT
#   lab.cmd64=B64      base64 of a shell command run after bring-up, framed like an agent command
#   lab.loop=1         print VDUP-TICK once a second in the background (ping the peer once each)
#   lab.off=1          power off after the above, which ends QEMU (-no-reboot)
#
# Output protocol (one line each, parsed by vduproxy.testing.qemu):
#   VDUP-MARKER eth0 up ip=.. mac=.. driver=.. carrier=.. mtu=.. rx_queues=N tx_queues=N features=0101..
#   VDUP-READY                      the serial agent reads commands from now on
#   host -> guest: "VDUP-RUN ID B64" runs base64-decoded B64 in a subshell (stdin /dev/null);
#   guest -> host: "VDUP-BEGIN ID", the command's output, "VDUP-END ID rc=N"
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
up() { cut -d' ' -f1 /proc/uptime; }
echo "VDUP: init start uptime=$(up)"

IP=10.0.2.15/24 PEER=10.0.2.2 PEERMAC=02:00:00:00:00:02 PING=0 LOOP=0 OFF=0 CMD64=
for a in $(cat /proc/cmdline); do
  case $a in
    lab.ip=*) IP=${a#*=} ;;
    lab.peer=*) PEER=${a#*=} ;;
    lab.peermac=*) PEERMAC=${a#*=} ;;
    lab.ping=*) PING=${a#*=} ;;
    lab.loop=*) LOOP=${a#*=} ;;
    lab.off=*) OFF=${a#*=} ;;
    lab.cmd64=*) CMD64=${a#*=} ;;
  esac
done

for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m" || echo "VDUP-ERROR: insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done

vdup_stats() {
  echo "rx_pkts=$(cat /sys/class/net/eth0/statistics/rx_packets) tx_pkts=$(cat /sys/class/net/eth0/statistics/tx_packets)"
}
# vdup_ping N [PEER]: ping and print "VDUP-PING-RESULT sent=N received=M peer=P"
vdup_ping() {
  _p=${2:-$PEER}
  ping -c "$1" -i 0.2 -W 2 "$_p" > /tmp/ping.out 2>&1
  cat /tmp/ping.out
  _s=$(grep 'packets transmitted' /tmp/ping.out)
  _tx=$(echo "$_s" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
  _rx=$(echo "$_s" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
  echo "VDUP-PING-RESULT sent=${_tx:-0} received=${_rx:-0} peer=$_p"
}
# vdup_send HOST PORT BYTES: send BYTES random bytes over TCP; prints VDUP-MD5 of what was sent
vdup_send() {
  head -c "$3" /dev/urandom > /tmp/tx
  echo "VDUP-MD5 $(md5sum < /tmp/tx | cut -d' ' -f1) bytes=$(wc -c < /tmp/tx)"
  nc -w 10 "$1" "$2" < /tmp/tx
  echo "VDUP-SENT rc=$?"
}
# vdup_recv PORT: accept one TCP connection, store it, print VDUP-MD5 of what was received
vdup_recv() {
  nc -l -p "$1" < /dev/null > /tmp/rx
  echo "VDUP-MD5 $(md5sum < /tmp/rx | cut -d' ' -f1) bytes=$(wc -c < /tmp/rx)"
}

if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  ip addr add "$IP" dev eth0
  [ "$PEERMAC" != none ] && arp -i eth0 -s "$PEER" "$PEERMAC"
  i=0
  while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
  V=$(basename "$(readlink /sys/class/net/eth0/device)")
  echo "VDUP-MARKER eth0 up ip=$IP mac=$(cat /sys/class/net/eth0/address)" \
    "driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")" \
    "carrier=$(cat /sys/class/net/eth0/carrier) mtu=$(cat /sys/class/net/eth0/mtu)" \
    "rx_queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)" \
    "tx_queues=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)" \
    "features=$(cat "/sys/bus/virtio/devices/$V/features")" \
    "uptime=$(up)"
else
  echo "VDUP-ERROR: no eth0"
  dmesg | grep -iE 'virtio|eth0' | sed 's/^/VDUP-DMESG: /'
fi

if [ "$PING" -gt 0 ] 2>/dev/null; then
  echo "VDUP: before ping $(vdup_stats)"
  vdup_ping "$PING"
  echo "VDUP: after ping $(vdup_stats)"
fi
if [ -n "$CMD64" ]; then
  echo "VDUP-BEGIN boot"
  (eval "$(echo "$CMD64" | base64 -d)") < /dev/null 2>&1
  echo "VDUP-END boot rc=$?"
fi
if [ "$LOOP" = 1 ]; then
  (
    n=0
    while true; do
      n=$((n+1))
      if ping -c 1 -W 1 "$PEER" > /dev/null 2>&1; then r=ok; else r=FAIL; fi
      echo "VDUP-TICK n=$n uptime=$(up) ping=$r $(vdup_stats)"
      sleep 1
    done
  ) < /dev/null &
fi
echo "VDUP-DONE uptime=$(up)"
[ "$OFF" = 1 ] && poweroff -f

# The serial agent: the console must not echo what the host types, or replies would contain the requests.
stty -echo 2> /dev/null
set -f
echo "VDUP-READY"
while IFS= read -r line; do
  case $line in
    "VDUP-RUN "*)
      set -- $line
      echo "VDUP-BEGIN $2"
      (eval "$(echo "$3" | base64 -d)") < /dev/null 2>&1
      echo "VDUP-END $2 rc=$?"
      ;;
  esac
done
# stdin never ends on a serial console, but if it does, init must not exit (that panics the kernel).
while true; do sleep 3600; done
