"""Lightning plugins."""

__all__: list[str] = []
