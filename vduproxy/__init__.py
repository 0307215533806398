"""vduproxy: a vhost-user back-end that drives vDPA net devices through a shadow virtqueue."""

__version__ = "0.1.0"
