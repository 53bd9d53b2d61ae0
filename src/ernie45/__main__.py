import sys

from ernie45.cli import main

sys.exit(main())
