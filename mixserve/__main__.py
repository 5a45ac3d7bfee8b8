import sys

from mixserve.cli import main

sys.exit(main())
