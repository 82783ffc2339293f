import sys

from lifecycle.pipeline.cli import main

sys.exit(main())
