import sys

from crishim.cli import main

sys.exit(main())
