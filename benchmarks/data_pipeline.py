"""Images per second of a cached epoch vs decoding DICOM every epoch, in one run.

Synthesizes one hospital, builds its training split with `sites.dataset.load_site` (CacheDataset:
DICOM decoded once), then times epochs through a DataLoader from the cache and from a plain MONAI
Dataset that runs the same transforms, DICOM decode included, on every access; the same for a
synthetic CT hospital's volumes (`volume_figures`: series assembled and decoded, or cached). Then
a real multi-frame colour file (pydicom's 120-frame YBR JPEG ultrasound cine): its frame items
through the site pipeline with the reader keeping the file's decode, vs decoding it per frame.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from monai.data import Dataset
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from fedhealth.core.synth import synthesize_federation
from fedhealth.core.synth.ct_federation import synthesize_ct
from sites.dataset import load_site, site_transforms
from sites.pipeline_config import datalist_item
from sites.volume_pipeline import volume_transforms


def images_per_second(data: Dataset, epochs: int, batch_size: int) -> float:
    """Mean throughput over `epochs` full passes (batches collated as in training)."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def frames_per_second(model_size: int, frames: int, decode_each: bool) -> float:
    """Frame items of pydicom's 120-frame colour cine through the site pipeline; `decode_each`:
    a fresh reader per item, so every frame decodes the whole file (as without the reader's keep)."""
    path = get_testdata_file("color3d_jpeg_baseline.dcm")
    transform = site_transforms(model_size)
    start = time.perf_counter()
    for frame in range(frames):
        if decode_each:
            transform = site_transforms(model_size)
        transform(datalist_item(path, 0, False, frame))
    return frames / (time.perf_counter() - start)


def volume_figures(series: int, size: int, grid: int, epochs: int) -> dict[str, float]:
    """Volumes per second of a cached epoch vs assembling and decoding every series each epoch:
    one synthetic CT hospital, its volumes through `load_site(volume_depth=...)`'s CacheDataset,
    and a plain MONAI Dataset running the same volume transforms on every access."""
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_ct(Path(tmp), 1, 0, series_per_site=series, image_size=size)
        start = time.perf_counter()
        splits = load_site(Path(tmp) / "hospital-1", image_size=grid, volume_depth=grid)
        build_s = time.perf_counter() - start
        cached = splits.train
        decoding = Dataset(cached.data, volume_transforms(grid, grid))
        return {"volumes": len(cached), "volume_load_site_seconds": build_s,
                "volume_decode_every_epoch_per_s": images_per_second(decoding, epochs, 2),
                "volume_cached_per_s": images_per_second(cached, epochs, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300, help="images in the synthetic site")
    parser.add_argument("--image-size", type=int, default=128, help="synthesized rows = columns")
    parser.add_argument("--model-size", type=int, default=64, help="model input size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--series", type=int, default=20, help="CT series in the volume part")
    parser.add_argument("--ct-size", type=int, default=64, help="synthesized CT rows = columns")
    parser.add_argument("--volume-grid", type=int, default=32, help="3D model input edge")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        synthesize_federation(Path(tmp), 1, 0, images_per_site=args.images,
                              image_size=args.image_size)
        start = time.perf_counter()
        splits = load_site(Path(tmp) / "hospital-1", image_size=args.model_size)
        build_s = time.perf_counter() - start
        cached = splits.train
        decoding = Dataset(cached.data, site_transforms(args.model_size))
        figures = {
            "images": len(cached),
            "load_site_seconds": build_s,
            "decode_every_epoch_images_per_s": images_per_second(decoding, args.epochs,
                                                                 args.batch_size),
            "cached_images_per_s": images_per_second(cached, args.epochs, args.batch_size),
        }
    figures["speedup"] = figures["cached_images_per_s"] / figures["decode_every_epoch_images_per_s"]
    figures["multi_frame_decoded_once_frames_per_s"] = frames_per_second(args.model_size, 120, False)
    figures["multi_frame_decoded_per_frame_frames_per_s"] = frames_per_second(args.model_size, 3,
                                                                              True)
    print(f"train split: {figures['images']} images of {args.image_size} px -> "
          f"{args.model_size} px, {args.epochs} epochs, batch {args.batch_size}")
    print(f"load_site (scan + one decode into the cache): {figures['load_site_seconds']:.2f} s")
    print(f"decode every epoch: {figures['decode_every_epoch_images_per_s']:10.0f} images/s")
    print(f"cached epoch:       {figures['cached_images_per_s']:10.0f} images/s")
    print(f"speedup:            {figures['speedup']:10.1f}x")
    print("120-frame 480 x 640 colour cine, frame items: "
          f"{figures['multi_frame_decoded_once_frames_per_s']:.1f} frames/s decoding the file once, "
          f"{figures['multi_frame_decoded_per_frame_frames_per_s']:.2f} frames/s decoding it per frame")
    figures |= volume_figures(args.series, args.ct_size, args.volume_grid, args.epochs)
    print(f"CT: {figures['volumes']} training volumes ({args.ct_size} px slices) -> "
          f"{args.volume_grid}^3; load_site {figures['volume_load_site_seconds']:.2f} s; "
          f"{figures['volume_decode_every_epoch_per_s']:.1f} volumes/s decoding every epoch, "
          f"{figures['volume_cached_per_s']:.0f} volumes/s cached")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         **figures}, indent=2))


if __name__ == "__main__":
    main()
