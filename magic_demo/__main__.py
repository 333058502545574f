import sys

from magic_demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
