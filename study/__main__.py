"""``python -m study [--quick | --smoke] [--out docs] [--parts lr,landscape]``."""

from study._report import main

if __name__ == "__main__":
    main()
