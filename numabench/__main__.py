"""`python -m numabench`: the same command line as the `numabench` script."""
from numabench.cli import main

if __name__ == "__main__":
    main()
