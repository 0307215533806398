import os

from setuptools import setup

# cffi out-of-line API mode: each builder compiles its C core into an extension module. setuptools wants the C
# sources as paths relative to this directory; the builders give them so when this is set.
os.environ["VDUPROXY_SETUPTOOLS_BUILD"] = "1"
setup(cffi_modules=["vduproxy/vdpa/_build_sim.py:ffibuilder", "vduproxy/_build_svq.py:ffibuilder"])
