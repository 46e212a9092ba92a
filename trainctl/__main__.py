"""`python -m trainctl` is the same as the `trainctl` console script."""

from trainctl.cli import main

if __name__ == "__main__":
    main()
