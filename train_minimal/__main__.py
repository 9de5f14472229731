"""``python -m train_minimal {train,eval,params,convert-fsanet}`` (see ``train_minimal/train.py``)."""
import gc

from .train import main

if __name__ == "__main__":
    # What the imports made (torch's ~190,000 objects) lives as long as the run: out of the cyclic
    # collector's way, whose full passes over them (~0.1 s each) the batches' label records set off
    # in the main process (README, "Where the load-time gap comes from"). The loader's workers do
    # the same.
    gc.freeze()
    raise SystemExit(main())
