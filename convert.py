"""Convert an FP16 HuggingFace model to EXL2: python convert.py -i <model> -o <work dir> -cf <output> -b <bpw>.

Flags follow upstream ExLlamaV2's convert.py. Without -c, calibration uses a built-in text corpus.
An interrupted job resumes when run again with the same -o.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from exllamav2.conversion.qparams import HEAD_OPTIONS

    p = argparse.ArgumentParser(description="Convert an FP16 model to EXL2")
    p.add_argument("-i", "--in_dir", type=str, help="input model directory (FP16/BF16 safetensors)")
    p.add_argument("-o", "--out_dir", type=str, required=True, help="work directory (job state, measurement)")
    p.add_argument("-res", "--resume", action="store_true", help="resume the job in -o (other options are ignored)")
    p.add_argument("-nr", "--no_resume", action="store_true", help="discard an unfinished job in -o and start over")
    p.add_argument("-cf", "--compile_full", type=str, help="output directory for the complete converted model")
    p.add_argument("-c", "--cal_dataset", type=str, help="calibration data: .parquet (text column) or text file")
    p.add_argument("-b", "--bits", type=float, default=4.125, help="target bits per weight of the layers")
    p.add_argument("-hb", "--head_bits", type=int, default=6, choices=sorted(HEAD_OPTIONS), help="bits of the head layer")
    p.add_argument("-ss", "--shard_size", type=float, default=8192, help="max shard size in MB (default 8192)")
    p.add_argument("-rs", "--rope_scale", type=float, help="RoPE scaling factor (linear)")
    p.add_argument("-ra", "--rope_alpha", type=float, help="RoPE alpha (NTK)")
    p.add_argument("-om", "--output_measurement", type=str, help="measure only, and save measurement.json here")
    p.add_argument("-m", "--measurement", type=str, help="reuse a measurement.json")
    p.add_argument("-r", "--dataset_rows", type=int, default=100, help="calibration rows for quantization")
    p.add_argument("-mr", "--measurement_rows", type=int, default=16, help="calibration rows for measurement")
    p.add_argument("-l", "--length", type=int, default=2048, help="tokens per calibration row")
    p.add_argument("-ml", "--measurement_length", type=int, default=2048, help="tokens per measurement row")
    p.add_argument("-v", "--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=" -- %(message)s")
    args = parse_args(argv)
    from exllamav2.conversion.pipeline import Converter, open_job
    from exllamav2.errors import ExLlamaV2Error

    if args.output_measurement and args.compile_full:
        print(" ## Error: -om (measure only) and -cf (compile) cannot be combined", file=sys.stderr)
        return 2
    if not 2.0 <= args.bits <= 8.0:
        logging.warning("target of %.3f bits per weight is outside 2..8 and will likely not be met", args.bits)
    om = args.output_measurement
    if om and Path(om).is_dir():
        om = str(Path(om) / "measurement.json")
    settings = dict(
        in_dir=args.in_dir, out_dir=args.out_dir, cal_dataset=args.cal_dataset, bits=args.bits,
        dataset_rows=args.dataset_rows, measurement_rows=args.measurement_rows, length=args.length,
        measurement_length=args.measurement_length, head_bits=args.head_bits,
        shard_size=args.shard_size if args.shard_size > 0 else 1024**3, compile_full=args.compile_full,
        rope_scale=args.rope_scale, rope_alpha=args.rope_alpha, output_measurement=om,
        measurement_file=args.measurement,
    )
    try:
        work_dir = Path(args.out_dir)
        job = open_job(work_dir, settings, args.resume, args.no_resume)
        Converter(job, work_dir).run()
    except (ExLlamaV2Error, ValueError, FileNotFoundError, ImportError) as e:   # bad input: the message says the fix
        if args.debug:
            raise
        print(f" ## Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
