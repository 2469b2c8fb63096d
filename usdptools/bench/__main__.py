import sys

from usdptools.bench.runner import main

sys.exit(main())
