import os
import sys

# Tests run on CPU, offline, with the repository root importable. MMPROMPT_TEST_GPU=1 leaves the
# GPUs visible, for the tests that need one (they are skipped without).
if os.environ.get("MMPROMPT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    # tests/test_fork.py runs, for a fork's new method, the tests named after it (one case per
    # method) and those with this mark
    config.addinivalue_line("markers", "whole_registry: one test over every method of "
                                       "prompts.METHODS")
