"""Test tooling shipped with the package: a guest (virtio-net driver over memfd memory) and a vhost-user
front-end, so integration tests and benchmarks can drive the proxy without a VM."""
