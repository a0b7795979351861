"""`python -m sla2cli ...` is `sla2 ...` (so `torchrun -m sla2cli finetune ...` works too)."""

from .cli import main

if __name__ == "__main__":
    main()
