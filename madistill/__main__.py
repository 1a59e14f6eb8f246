import sys

from madistill.cli import main

sys.exit(main())
