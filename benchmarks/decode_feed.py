"""How to feed DALI: bytes located by our metadata (external_source) vs DALI's own webdataset reader.

Prints one JSON object per measurement (images/s on the same shards, same preprocessing), plus
the ratio of the two DALI feeds. Run: ``python benchmarks/decode_feed.py [--images 256]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

import dask_imgcurator as ic
from dask_imgcurator.cli import _write_input_index
from dask_imgcurator.decode import DaliDecoder, PillowDecoder, PreprocessSpec
from dask_imgcurator.io.shards import read_ranges


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="imgcurator-bench-")
    shards = ic.make_demo_shards(f"{work}/in", n_shards=2, samples_per_shard=args.images // 2, min_side=512, max_side=1600)
    for s in shards:
        _write_input_index(s, None)
    df = ic.read_webdataset(shards).compute()
    df = df[df["image_member"].str.endswith(".jpg")]  # the reader path below decodes one extension
    spec = PreprocessSpec(size=224)
    n = len(df)

    results = {}

    def record(name: str, seconds: float, **extra) -> None:
        results[name] = n / seconds
        print(json.dumps({"benchmark": "decode_feed", "method": name, "images": n, "seconds": round(seconds, 3),
                          "images_per_s": round(n / seconds, 1), "threads": args.threads, **extra}))

    def external(decoder) -> float:
        start = time.perf_counter()
        for shard, g in df.groupby("shard", sort=False):
            blobs = read_ranges(shard, list(zip(g.image_offset, g.image_nbytes)))  # read included
            for i in range(0, len(blobs), args.batch_size):
                decoder.decode(blobs[i : i + args.batch_size])
        return time.perf_counter() - start

    dali = DaliDecoder(spec, num_threads=args.threads, batch_size=args.batch_size)
    external(dali)  # build + warm up
    record("dali_external_source", external(dali))
    record("dali_webdataset_reader", _reader_seconds(shards, spec, args))
    record("pillow", external(PillowDecoder(spec, draft=False)))
    record("pillow_draft", external(PillowDecoder(spec, draft=True)))
    print(json.dumps({"benchmark": "decode_feed", "ratio": "external_source/webdataset_reader",
                      "value": round(results["dali_external_source"] / results["dali_webdataset_reader"], 3)}))


def _reader_seconds(shards: list[str], spec: PreprocessSpec, args) -> float:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=args.batch_size, num_threads=args.threads, device_id=None)
    def pipe():
        jpg = fn.readers.webdataset(paths=shards, index_paths=[s[:-3] + "idx" for s in shards], ext=["jpg"],
                                    missing_component_behavior="skip", name="reader")
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=spec.size, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(img, crop=(spec.size, spec.size), mean=[m * 255 for m in spec.mean],
                                        std=[s * 255 for s in spec.std], output_layout="CHW", dtype=types.FLOAT)

    p = pipe()
    p.build()
    p.run()  # warm up
    p.reset()
    start = time.perf_counter()
    batches = int(np.ceil(p.epoch_size("reader") / args.batch_size))
    for _ in range(batches):
        p.run()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
