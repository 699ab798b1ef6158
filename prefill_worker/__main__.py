import sys

from pdserve.worker_host import main
from prefill_worker.servicer import PrefillServicer

sys.exit(main("prefill", PrefillServicer))
