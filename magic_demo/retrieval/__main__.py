import sys

from magic_demo.retrieval.cli import main

sys.exit(main())
