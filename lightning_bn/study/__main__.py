"""``python -m lightning_bn.study [--quick | --smoke] [--out docs] [--parts lr,landscape]``."""

from lightning_bn.study._report import main

if __name__ == "__main__":
    main()
