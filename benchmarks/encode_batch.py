"""Image-encoding throughput of the `lite` backbone by batch size, on random pixels (a quick check of the
CPU allocator effect described in docs/benchmarks.md).

    python -m benchmarks.encode_batch
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 python -m benchmarks.encode_batch
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    import adaclip

    backbone = adaclip.create_backbone("lite", None)
    backbone.model.eval()
    for batch_size in (16, 32, 64, 128):
        pixels = torch.randn(batch_size, 3, 224, 224)
        with torch.no_grad():
            backbone.encode_image(pixels)  # warm-up
            started = time.perf_counter()
            for _ in range(2):
                backbone.encode_image(pixels)
            seconds = time.perf_counter() - started
        print(f"batch {batch_size}: {2 * batch_size / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
