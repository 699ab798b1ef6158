import sys

from pdserve.worker_process import main

sys.exit(main("prefill"))
