"""A C CRC-32C for TensorBoard's event writer, whose own is pure Python.

Every record TensorBoard's ``EventFileWriter`` writes carries two masked CRC-32C checksums, computed by
``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c``: a Python loop over every byte, about 0.15 us a
byte. The monitor's scalars of one step are one record of ~10 KB (245 scalars on the example CNN), so logging every step
costs 1.4 ms of checksum a step (``python -m benchmarks.writing``), in the writer thread but holding the GIL, so
the training thread waits for it. ``google-crc32c`` computes the same checksum in C (about 1 us for the same record,
same benchmark); :func:`fast_tensorboard_checksums` puts it in place of the pure
Python one in TensorBoard's record writer. The files written are byte for byte the same (tested against TensorBoard's
own function and read back by its reader, which verifies the checksums).
"""

from __future__ import annotations

from typing import Any

__all__ = ["fast_tensorboard_checksums", "masked_crc32c"]

_MASK = 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of ``data`` (``google-crc32c``'s C implementation of the CRC).

    Raises:
        ImportError: ``google-crc32c`` is not installed.
    """
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _MASK


def fast_tensorboard_checksums() -> bool:
    """Make TensorBoard's event writer (``tensorboard.summary.writer.record_writer``) checksum records in C.

    Idempotent; process-wide (every ``SummaryWriter`` benefits, and writes the same bytes as before). Returns whether
    the C checksum is in place: false when ``google-crc32c`` or its compiled extension is missing, or when this
    TensorBoard has no ``record_writer.masked_crc32c`` to replace; then nothing is changed.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    current: Any = getattr(record_writer, "masked_crc32c", None)
    if current is None:
        return False
    if current is masked_crc32c:
        return True
    if getattr(google_crc32c, "implementation", "c") != "c":  # its pure-Python fallback is no faster
        return False
    record_writer.masked_crc32c = masked_crc32c
    return True
