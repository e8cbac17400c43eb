"""Peak memory of benchmark steps, measured in a process of its own (malloc set to return memory
to the OS, see common.exact_memory_mode). Reads a JSON list of configs on stdin, prints a JSON
list of peak bytes. Called by the benchmarks through common.memory_in_child."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import exact_memory_mode, peak_memory  # noqa: E402

if __name__ == "__main__":
    exact_memory_mode()
    module = importlib.import_module(sys.argv[1])
    configs = json.loads(sys.stdin.read())
    print(json.dumps([peak_memory(module.make_step(**c)) for c in configs]))
