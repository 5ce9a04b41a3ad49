"""Progress without a terminal: a plain log line every N seconds with step, samples/s and the epoch's ETA."""
import logging

from src.train.loop import ProgressLog, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_period_with_speed_and_eta(caplog):
    clock = Clock()
    progress = ProgressLog(epoch=3, n_batches=100, every=60, clock=clock)
    logged = []
    with caplog.at_level(logging.INFO, logger="causalmer"):
        for step in range(1, 101):
            clock.now = 2.0 * step  # 2 s a step, 16 samples a step
            logged.append(progress.update(step, 16 * step))
    # Lines at 60 s, 120 s, 180 s; none at the last step (the epoch line follows it).
    assert [i + 1 for i, did in enumerate(logged) if did] == [30, 60, 90]
    first = [r.getMessage() for r in caplog.records][0]
    assert first == "epoch 3 | step 30/100 | 8.0 samples/s | epoch ETA 2m20s"


def test_no_lines_when_turned_off():
    clock = Clock()
    progress = ProgressLog(epoch=1, n_batches=10, every=0, clock=clock)
    clock.now = 1e6
    assert not progress.update(5, 50)


def test_duration():
    assert (duration(12), duration(245), duration(3720)) == ("12s", "4m05s", "1h02m")


def test_the_training_loop_logs_progress_without_a_terminal(caplog):
    """Under pytest stderr is no terminal, so tqdm is off and the epoch reports itself in plain lines."""
    import torch

    from src.run.distributed import Context
    from src.train.loop import train_epoch
    from tests.test_accumulation import Gradients, Slope

    model = Slope()
    tcfg = {"batch_size": 1, "accumulate": 1, "accumulation": "corrected", "grad_clip_value": None,
            "grad_clip_norm": None, "missing_rate": 0.0}
    with caplog.at_level(logging.INFO, logger="causalmer"):
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), Gradients([0.1] * 5), tcfg,
                    Context(torch.device("cpu")), seed=0, epoch=2, amp=False, progress_seconds=1e-9)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 2 | step")]
    assert [line.split(" | ")[1] for line in lines] == ["step 1/5", "step 2/5", "step 3/5", "step 4/5"]
