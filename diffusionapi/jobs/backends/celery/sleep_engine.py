"""An engine that sleeps instead of generating: queue benchmarks measure the queue, not the GPU.

It honours the Engine protocol (``generate(plan, report, cancelled)``): it reports progress,
stops when cancelled, and returns one small grey image per requested image. No torch import.
"""
from __future__ import annotations

import time


class SleepEngine:
    def __init__(self, seconds: float = 1.0, slices: int = 4):
        self.seconds = seconds
        self.slices = max(1, slices)
        self.loaded_model: str | None = None

    def generate(self, plan, report, cancelled):
        from PIL import Image

        from ....engine.plan import GeneratedImage, GenerationResult, JobCancelled

        report("generation", 0.0)
        for i in range(self.slices):
            if cancelled():
                raise JobCancelled()
            time.sleep(self.seconds / self.slices)
            report("generation", 100.0 * (i + 1) / self.slices * 0.99)
        self.loaded_model = getattr(plan.model, "name", plan.model)
        n = max(1, getattr(plan, "batch_size", 1) * getattr(plan, "n_iter", 1))
        images = [GeneratedImage(Image.new("RGB", (plan.width, plan.height), (128, 128, 128)),
                                 plan.seed + i, {"Steps": plan.steps, "Seed": plan.seed + i, "Model": self.loaded_model})
                  for i in range(n)]
        return GenerationResult(images=images, load_time_sec=0.0)
