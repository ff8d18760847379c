import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import reference.py and factories.py by name
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
