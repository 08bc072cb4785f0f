import os
import sys

# Test helpers (simcomm.py, costmodel.py) live next to this file; tests/mpi imports them too.
sys.path.insert(0, os.path.dirname(__file__))
