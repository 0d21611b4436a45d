"""Two local worker processes and a large-model captioner: the captioner is loaded once, in
one worker process (Beam's MultiProcessShared: the first to ask hosts it), and both workers
caption through it."""

from __future__ import annotations

import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from prep.transforms.caption import CaptionHandler
from prep.transforms.inference import ModelStage

TESTS = os.path.dirname(os.path.abspath(__file__))


class CountingCaptioner(CaptionHandler):
    """Appends one line (its pid) to `log` per model load."""

    def __init__(self, *args, log: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    def load_model(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().load_model()

    def prepare(self, sample, model):
        with open(self.log + ".workers", "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().prepare(sample, model)


def _key(sample):
    return sample.key, bool(sample.caption_vlm)


def test_two_worker_processes_share_one_captioner(tiny, tmp_path, monkeypatch):
    from test_handlers import _sample

    # The worker processes import this module to unpickle the handler.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    log = str(tmp_path / "loads.txt")
    handler = CountingCaptioner(tiny.captioner, max_new_tokens=4, device="cpu", max_batch_size=2, on_bad="keep",
                                large_model=True, model_copies=1, prepare_threads=2, log=log)
    samples = [_sample(i) for i in range(24)]
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
        ok, dead = (p | beam.Create(samples) | beam.Reshuffle() | "Caption" >> ModelStage(handler))
        assert_that(ok | beam.Map(_key), equal_to([(s.key, True) for s in samples]))
        assert_that(dead, equal_to([]), label="NoDeadLetters")
    loads = open(log).read().split()
    workers = set(open(log + ".workers").read().split())
    assert len(loads) == 1, loads  # one copy, however many workers
    assert str(os.getpid()) not in workers | set(loads)  # worker processes, not this one
    # Both workers captioned; the first to ask hosts the copy, the other calls it through
    # Beam's proxy (MultiProcessShared).
    assert len(workers) == 2, workers
