from setuptools import setup

# cffi out-of-line API mode: each builder script compiles its C core into an extension module.
setup(cffi_modules=["vduproxy/vdpa/_build_sim.py:ffibuilder", "vduproxy/_build_svq.py:ffibuilder"])
