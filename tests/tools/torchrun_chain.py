"""Run several `rae` commands one after the other in this process, as the console script would
run each: ``python -m torch.distributed.run --nproc_per_node 2 tests/tools/torchrun_chain.py CHAIN.json``,
where CHAIN.json holds a list of argument lists. One torchrun launch (one process group, one import
of torch per rank) serves a whole chain of stages; each stage joins the group that is there."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rae_cli.main import app  # noqa: E402

for argv in json.loads(Path(sys.argv[1]).read_text()):
    code = app(argv, standalone_mode=False)
    if code:  # a user error: its one line is already printed
        sys.exit(code)
