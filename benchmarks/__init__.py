"""The reproducible benchmark: callsock beside a FastAPI sample and Node + ws (see run.py)."""
