"""The one compiled part of sidusd, optional: the lockstep TFTP accelerator and batched UDP I/O.

Everything else is in pyproject.toml.  ``optional=True``: without a C compiler
(gcc, libc6-dev, python3-dev) the install goes on and sidusd serves lockstep
transfers with its pure-Python path and sends and reads one datagram per system
call (docs/decisions.md, "A C accelerator for lockstep TFTP").
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("sidusd.net._lockstep",
              ["sidusd/net/_lockstep.c", "sidusd/net/_engine.c", "sidusd/net/_wait.c", "sidusd/net/_runread.c",
               "sidusd/net/_batchio.c", "sidusd/net/_sendbatch.c"],
              depends=["sidusd/net/_lockstep.h"], optional=True,
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                  "-Wno-unused-parameter", "-Wno-cast-function-type"]),
])
