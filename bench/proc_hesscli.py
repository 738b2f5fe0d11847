"""``hesscli compute`` as a whole process, with its peak memory growth after ``import torch``.

    python bench/proc_hesscli.py compute MODEL --data D -o OUT --force --quiet

Exactly the console script's work (``hesscli.cli.main``), preceded by ``import torch`` (which hesscli
imports anyway) so the resident set after it can be read; prints one JSON line last.
"""

import json
import os
import resource
import sys

import torch  # noqa: F401

with open("/proc/self/statm") as f:
    rss0 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

from hesscli.cli import main  # noqa: E402

rc = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rc": rc, "peak_growth": peak - rss0}))
sys.exit(rc)
