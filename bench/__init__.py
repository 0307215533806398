"""Benchmarks: vduproxy against DPDK's vhost PMD on the same machine in the same run (`python -m bench`)."""
