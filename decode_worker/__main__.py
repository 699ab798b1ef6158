import sys

from decode_worker.servicer import DecodeServicer
from pdserve.worker_host import main

sys.exit(main("decode", DecodeServicer))
