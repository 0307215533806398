"""Kernel test tier: a kernel with vdpa_sim_net built in, booted under QEMU TCG over the host's root."""
