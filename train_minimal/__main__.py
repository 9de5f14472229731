"""``python -m train_minimal {train,eval,params,convert-fsanet}`` (see ``train_minimal/train.py``)."""
from .train import main

if __name__ == "__main__":
    raise SystemExit(main())
