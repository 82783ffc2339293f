import sys

from lifecycle.retrain.controller import main

sys.exit(main())
