"""train.py killed (SIGKILL, as a power cut or the OOM killer would) at a chosen point of a write, for the crash
tests; run it as train.py is run, under any launcher:

    python tests/crashing_train.py checkpoint 4 -- TRAIN.PY ARGS   # inside step 4's checkpoint, before its marker
    python tests/crashing_train.py tokenizer 1 -- TRAIN.PY ARGS    # tokenizer copy written, not yet fsynced/renamed

The kill goes through the functions train.py calls there (glm_train.checkpoint.mark_complete / fsync_tree),
replaced in this process only: the shipped code has no fault-injection switch.
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm_train import checkpoint  # noqa: E402

import train  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_checkpoint(step: int):
    mark_complete = checkpoint.mark_complete

    def marking(temporary, at):
        if at == step:
            die()  # everything written and fsynced, the completion marker and the rename not yet
        mark_complete(temporary, at)

    checkpoint.mark_complete = marking


def kill_in_tokenizer():
    fsync_tree = checkpoint.fsync_tree

    def syncing(folder):
        if Path(folder).name == checkpoint.TOKENIZER_TEMPORARY:
            die()  # the copy written but not fsynced or renamed
        fsync_tree(folder)

    checkpoint.fsync_tree = syncing


if __name__ == "__main__":
    where, at, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    {"checkpoint": lambda: kill_in_checkpoint(int(at)), "tokenizer": kill_in_tokenizer}[where]()
    train.main(argv)
