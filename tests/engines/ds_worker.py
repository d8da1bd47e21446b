"""One rank of the DeepSpeed equivalence test (launched by tests/engines/test_deepspeed.py via torchrun).

Starts from the same tiny embedded model as the single-process trainer, loads the saved training batch, runs two optimizer steps with
trainer.strategy=deepspeed and writes each step's metrics and the final weights (rank 0).
"""

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    tests_dir = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(tests_dir))
    from conftest import TINY_OVERRIDES, compose_config
    from rlspec.session import build_trainer

    work, stage = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = compose_config([*TINY_OVERRIDES, f"run_dir={work / f'run{stage}'}", *json.loads((work / "overrides.json").read_text()),
                          "trainer.strategy=deepspeed", f"trainer.deepspeed.zero_stage={stage}"])
    trainer = build_trainer(cfg, work / f"run{stage}")
    batch = torch.load(work / "batch.pt", weights_only=False)
    steps = []
    for step in (1, 2):
        steps.append(trainer.update_policy(batch, step=step))
        trainer.strategy.sync_policy()
    if trainer.strategy.is_main:
        (work / f"metrics{stage}.json").write_text(json.dumps(steps))
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, work / f"final{stage}.pt")
    trainer.strategy.close()


if __name__ == "__main__":
    main()
