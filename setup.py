"""The one compiled part: ``lightning_bn._kernels`` (one-pass tensor summaries for the monitor).

Optional: without a C compiler the install still succeeds and ``lightning_bn.stats`` uses torch kernels instead
(``lightning_bn.stats.summary_backend()`` says which is in use). Everything else is in ``pyproject.toml``.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lightning_bn._kernels",
            ["lightning_bn/_kernels.c"],
            extra_compile_args=["-O3", "-std=gnu11"],
            optional=True,
        )
    ]
)
