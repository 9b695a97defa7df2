import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (the label audit's folds) imports it
    sys.exit(main())
