import sys

from usdp.bench.runner import main

sys.exit(main())
