import sys

from mlops.pipeline.cli import main

sys.exit(main())
