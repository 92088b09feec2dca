"""Lightning callbacks: thin layers over the package's pure-PyTorch logic."""

__all__: list[str] = []
