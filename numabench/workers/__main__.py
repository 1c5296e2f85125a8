"""`python -m numabench.workers --config JSON | --config-file PATH`: one worker process."""
import logging
import os
import sys

from numabench.workers.worker import main

if __name__ == "__main__":
    code = main()
    # The socket is closed and the reply sent; skip the interpreter's teardown, where a loaded
    # framework can spend a second or more freeing its pools (times many instances, at stop).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
