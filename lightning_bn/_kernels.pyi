"""Type stub of the C extension built from ``_kernels.c`` (see that file and ``setup.py``)."""

def summarize(
    address: int, dtype: int, lead: int, channels: int, trail: int, zero_tol: float, channel_address: int
) -> tuple[float, float, float, float, float, float]: ...
